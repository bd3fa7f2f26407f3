"""Experiment configs shipped with the package (YAML): `gauss train --config ml-1m-hstu` resolves names here."""
