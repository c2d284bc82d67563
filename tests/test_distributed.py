"""The probe under torch.distributed (gloo, two CPU processes) gives the single-process scores."""
import os
import socket

import numpy as np
import pandas as pd
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import random_batch
from placement.probe import ProbeSettings, probe
from placement.model.sites import find_sites
from tiny import tiny_model

BATCHES = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = tiny_model("llama")
        result = probe(model, find_sites(model), [random_batch(s) for s in range(BATCHES)], ProbeSettings(seed=1))
        if rank == 0:
            result.scores.to_csv(out, index=False)
            np.save(out + ".batches.npy", result.batch_page)
    finally:
        dist.destroy_process_group()


def test_two_process_probe_matches_one_process(tmp_path):
    out = str(tmp_path / "scores.csv")
    mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    model = tiny_model("llama")
    single = probe(model, find_sites(model), [random_batch(s) for s in range(BATCHES)], ProbeSettings(seed=1))
    both = pd.read_csv(out)
    for column in ("page", "page_sampled", "grad_energy", "fisher", "coherence"):
        np.testing.assert_allclose(both[column], single.scores[column], rtol=1e-5, err_msg=column)
    np.testing.assert_allclose(np.load(out + ".batches.npy"), single.batch_page, rtol=1e-5)
