"""The `gauss` CLI."""
from __future__ import annotations

import json

from gauss_plugins.cli import main


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_plugins_table_lists_kind_name_provider_availability(capsys, fresh_registry):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0].split()
    assert header == ["kind", "name", "provider", "available"]
    assert "attention_backend" in out and "gauss-plugins" in out


def test_plugins_json_filters_by_kind(capsys, fresh_registry):
    assert main(["plugins", "--json", "--kind", "table_backend"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["components"] and {r["kind"] for r in data["components"]} == {"table_backend"}
    for row in data["components"]:
        assert row["available"] or row["reason"]
