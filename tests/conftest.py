import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


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
