import gc
import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One intra-op thread in the test process and the processes it starts (torchrun, killed training runs, the
# notebook): the tiny models gain nothing from a second one, which on two cores spins and doubles the CPU time.
# OMP_NUM_THREADS set by the caller is kept.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_collection_finish(session):
    """Freeze what start-up and collection made (half a million objects from torch, transformers and pandas): the
    full collections the trainer's memory figures start with then scan only what the tests make, milliseconds
    instead of a third of a second each."""
    gc.collect()
    gc.freeze()


def random_batch(seed: int = 0, batch: int = 3, length: int = 12, vocab: int = 90):
    """Random token ids with ragged lengths, right padding and prompt tokens masked out of the labels."""
    from placement.data import collate

    g = torch.Generator().manual_seed(seed)
    rendered = []
    for i in range(batch):
        n = length - i * 2
        ids = torch.randint(5, vocab, (n,), generator=g).tolist()
        prompt = 3 + i
        rendered.append((ids, [-100] * prompt + ids[prompt:]))
    return collate(rendered, pad_id=0)


@pytest.fixture
def batches():
    return [random_batch(seed) for seed in range(3)]


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A tiny random Llama (3 layers) with a chat tokenizer, saved as a model folder the CLI can load."""
    from tiny import tiny_model, tiny_tokenizer

    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", num_hidden_layers=3).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


# The calibration the shared profile runs with: small enough for seconds, two batches for the bootstrap's convergence.
PROFILE = ("--data", "builtin:arithmetic", "--batches", "2", "--batch-size", "4", "--max-length", "48", "--quiet")


@pytest.fixture(scope="session")
def profiled(invoke, model_dir, tmp_path_factory):
    """The tiny model profiled once per session with PROFILE: (the profile folder, the --json summary). A test that
    changes the folder copies it first, or puts it back as it was."""
    out = tmp_path_factory.mktemp("profiled") / "run"
    result = invoke("profile", "--model", model_dir, *PROFILE, "--out", out, "--json")
    assert result.exit_code == 0, result.output
    return out, json.loads(result.output)


@pytest.fixture(scope="session")
def profile_dir(profiled):
    """The shared profile's folder (scores.csv, plan.json, ...), as `plan` and `train --plan` take it."""
    return profiled[0]


@pytest.fixture(scope="session")
def invoke():
    """Run the `placement` command line in-process: invoke("profile", "--model", ...) -> click's Result."""
    from helpers import invoke

    return invoke


@pytest.fixture(scope="session")
def assert_one_line_error():
    """Check a user-error exit: non-zero, one line, no traceback, naming the given words."""
    from helpers import assert_one_line_error

    return assert_one_line_error


@pytest.fixture(scope="session")
def make_plan():
    """make_plan(model, strategy, scores=None) -> a Plan over a synthetic ranking of the model's sites."""
    from helpers import make_plan

    return make_plan
