"""Dynamic tables are not synchronised across ranks yet: training them under DDP or TorchRec's
DistributedModelParallel at world size > 1 must fail clearly (each rank would otherwise train
its own diverging table), before any row changes; eval reads still work. The in-process
checks of the table itself (a fake world of 2, and world size 1) are in
tests/embedding/test_table.py."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("torchrec")

_WORKER = textwrap.dedent(
    """
    import json, os, sys
    import torch, torch.distributed as dist, torch.multiprocessing as mp

    def worker(rank, world, port, out):
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
        dist.init_process_group("gloo", rank=rank, world_size=world)
        from torchrec.distributed.model_parallel import DistributedModelParallel
        from torchrec.modules.embedding_configs import EmbeddingBagConfig
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
        from gauss_integrations.torchrec import DynamicEmbeddingBagCollection
        from gauss_plugins.embedding import ReplicatedTableError

        class Model(torch.nn.Module):
            def __init__(self):
                super().__init__()
                cfg = [EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=10, feature_names=["f"])]
                self.ebc = DynamicEmbeddingBagCollection(cfg)
                self.lin = torch.nn.Linear(4, 1)

            def forward(self, kjt):
                return self.lin(self.ebc(kjt).values())

        kjt = KeyedJaggedTensor(keys=["f"], values=torch.tensor([1, 2 + rank]), lengths=torch.tensor([1, 1]))
        res = {}
        for name, wrap in (("ddp", torch.nn.parallel.DistributedDataParallel),
                           ("dmp", lambda m: DistributedModelParallel(m, device=torch.device("cpu")))):
            model = Model()
            table = model.ebc.embedding_bags["t"]
            wrapped = wrap(model)
            try:
                wrapped(kjt)
                res[name] = "trained"
            except ReplicatedTableError as exc:
                res[name] = str(exc)
            res[name + "_rows_after"] = len(table)
            model.eval()
            res[name + "_eval_shape"] = list(wrapped(kjt).shape)
        with open(os.path.join(out, f"{rank}.json"), "w") as f:
            json.dump(res, f)
        dist.destroy_process_group()

    if __name__ == "__main__":
        mp.spawn(worker, args=(2, int(sys.argv[1]), sys.argv[2]), nprocs=2)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_and_dmp_at_world_size_2_raise_before_any_row_changes(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    proc = subprocess.run([sys.executable, str(script), str(_free_port()), str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        res = json.loads((tmp_path / f"{rank}.json").read_text())
        for name in ("ddp", "dmp"):
            assert "'t' is trained in a process group of world size 2" in res[name], res[name]
            assert "each rank would train its own diverging table" in res[name]
            assert res[f"{name}_rows_after"] == 0  # refused before inserting anything
            assert res[f"{name}_eval_shape"] == [2, 1]  # reading in eval mode is fine
