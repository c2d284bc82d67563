"""Loading, rendering, batching and splitting of task data, offline with the character-level tokenizer."""
from __future__ import annotations

import json
import os
import re
import warnings

import pandas as pd
import pytest
import torch

from placement.data import (
    Batch,
    DataError,
    Example,
    arithmetic_records,
    builtin_names,
    load_records,
    make_batches,
    prompt_ids,
    render,
    split_examples,
    to_examples,
)
from placement.data.batches import training_batches
from placement.model.load import MANIFEST, cache_root
from tiny import tiny_tokenizer

SHARED = "/work/shared/data/llm-adapters"
needs_shared = pytest.mark.skipif(not os.path.isdir(SHARED), reason="shared task data not present")
ALPACA = [
    {"instruction": "What is 3 + 4?", "input": "", "output": "7", "answer": "7"},
    {"instruction": "Say hi", "input": "to Bob", "output": "hi Bob", "answer": None},
]


def one_line_error(call, *args, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert message and "\n" not in message
    return message


def decode(tokenizer, ids) -> str:
    return tokenizer.decode([i for i in ids if i != -100])


# -- builtin arithmetic ----------------------------------------------------------------------------------------------
def test_arithmetic_is_deterministic_correct_and_unique():
    records = arithmetic_records(500, seed=3)
    assert records == arithmetic_records(500, seed=3)
    assert records != arithmetic_records(500, seed=4)
    questions = [r["instruction"] for r in records]
    assert len(set(questions)) == 500
    ops = set()
    for r in records:
        match = re.fullmatch(r"What is (\d+) ([-+*]) (\d+)\?", r["instruction"])
        assert match, r["instruction"]
        ops.add(match.group(2))
        expected = eval(f"{match.group(1)} {match.group(2)} {match.group(3)}")
        assert r["output"] == r["answer"] == str(expected)
        assert r["input"] == ""
    assert ops == {"+", "-", "*"}
    assert any(r["answer"].startswith("-") for r in records)


def test_builtin_spec_default_size_and_names():
    assert "arithmetic" in builtin_names()
    assert len(load_records("builtin:arithmetic")) == 4000
    assert load_records("builtin:arithmetic", n=20, seed=1) == arithmetic_records(20, seed=1)


# -- loading files ---------------------------------------------------------------------------------------------------
@needs_shared
def test_shared_json_lists_load():
    boolq = load_records(f"{SHARED}/boolq-train.json")
    assert len(boolq) == 9427
    assert set(boolq[0]) == {"instruction", "input", "output", "answer"}
    arc = load_records(f"{SHARED}/ARC-Easy-test.json", n=25)
    assert len(arc) == 25
    examples = to_examples(arc)
    assert examples[0].answer == "answer1"
    assert examples[0].response == "the correct answer is answer1"
    assert examples[0].prompt[0]["content"].startswith("Please choose the correct answer")


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_local_formats_load(tmp_path, suffix):
    path = tmp_path / f"data{suffix}"
    frame = pd.DataFrame(ALPACA)
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in ALPACA))
    elif suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path)
    examples = to_examples(load_records(str(path)))
    assert [e.response for e in examples] == ["7", "hi Bob"]
    assert examples[0].prompt == [{"role": "user", "content": "What is 3 + 4?"}]
    assert examples[1].prompt == [{"role": "user", "content": "Say hi\n\nto Bob"}]
    assert examples[0].answer == "7" and examples[1].answer is None


def test_chat_and_text_records(tmp_path):
    chat = [{"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]}]
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(chat[0]) + "\n")
    (example,) = to_examples(load_records(str(path)))
    assert example.prompt == chat[0]["messages"][:2]
    assert example.response == "4" and example.text is None

    text_path = tmp_path / "text.json"
    text_path.write_text(json.dumps([{"text": "hello world"}, {"text": "more"}]))
    examples = to_examples(load_records(str(text_path)))
    assert examples[0] == Example(prompt=None, response=None, text="hello world")


def test_chat_record_must_end_with_assistant():
    records = [{"messages": [{"role": "user", "content": "hi"}]}]
    assert "assistant" in one_line_error(to_examples, records)


# -- bad input -------------------------------------------------------------------------------------------------------
def test_missing_file(tmp_path):
    message = one_line_error(load_records, str(tmp_path / "nope.json"))
    assert "not found" in message and "builtin:arithmetic" in message


def test_unknown_builtin():
    message = one_line_error(load_records, "builtin:foo")
    assert "'foo'" in message and "arithmetic" in message


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    assert "empty" in one_line_error(load_records, str(path))


def test_unreadable_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    assert "cannot read" in one_line_error(load_records, str(path))


def test_unknown_extension(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("hello")
    assert ".txt" in one_line_error(load_records, str(path))


def test_unknown_fields():
    message = one_line_error(to_examples, [{"question": "q", "label": 1}])
    assert "question" in message and "label" in message and "instruction" in message and "messages" in message


# -- rendering -------------------------------------------------------------------------------------------------------
def test_render_with_chat_template_targets_response_and_end_of_turn():
    tok = tiny_tokenizer(chat=True)
    example = to_examples(ALPACA[:1])[0]
    ids, labels = render(tok, example, max_length=512)
    assert len(ids) == len(labels)
    targets = [t for t in labels if t != -100]
    assert decode(tok, targets) == "7<|im_end|>"
    prompt = prompt_ids(tok, example)
    assert ids[: len(prompt)] == prompt
    assert all(t == -100 for t in labels[: len(prompt)])
    assert decode(tok, prompt) == "<|im_start|>user\nWhat is 3 + 4?<|im_end|>\n<|im_start|>assistant\n"
    # ChatML's newline after <|im_end|> is not part of the sequence: the response ends the example.
    assert ids[-1] == tok.eos_token_id


def test_render_when_prompt_is_not_a_prefix_of_the_conversation():
    tok = tiny_tokenizer(chat=True)
    # A template that marks the last user turn differently once an answer follows it.
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' and not add_generation_prompt %}[{{ m['content'] }}]"
        "{% else %}{{ m['content'] }}{% endif %}{% endfor %}{% if add_generation_prompt %}>{% endif %}"
    )
    example = to_examples(ALPACA[:1])[0]
    ids, labels = render(tok, example, max_length=512)
    assert decode(tok, ids) == "What is 3 + 4?>7<|im_end|>"
    assert decode(tok, labels) == "7<|im_end|>"


def test_render_without_chat_template_uses_alpaca_layout():
    tok = tiny_tokenizer(chat=False)
    example = to_examples(ALPACA[1:])[0]
    ids, labels = render(tok, example, max_length=512)
    assert decode(tok, ids) == "### Instruction:\nSay hi\n\nto Bob\n\n### Response:\nhi Bob<|im_end|>"
    assert decode(tok, labels) == "hi Bob<|im_end|>"
    assert labels[-1] == tok.eos_token_id


def test_render_text_every_token_is_a_target():
    tok = tiny_tokenizer()
    ids, labels = render(tok, Example(prompt=None, response=None, text="abc def"), max_length=512)
    assert ids == labels
    assert decode(tok, ids) == "abc def"
    with pytest.raises(DataError):
        prompt_ids(tok, Example(prompt=None, response=None, text="abc"))


def test_render_truncation():
    tok = tiny_tokenizer()
    example = to_examples(ALPACA[:1])[0]
    cut = len(prompt_ids(tok, example))
    assert render(tok, example, max_length=cut) is None
    ids, labels = render(tok, example, max_length=cut + 1)
    assert len(ids) == cut + 1 and decode(tok, labels) == "7"
    # The first token is never a target after the causal shift, so one token of text is nothing to learn.
    assert render(tok, Example(prompt=None, response=None, text="abc"), max_length=1) is None


# -- batching --------------------------------------------------------------------------------------------------------
def test_make_batches_shapes_padding_and_targets():
    tok = tiny_tokenizer()
    examples = to_examples(arithmetic_records(40, seed=0))
    batches = make_batches(tok, examples, batch_size=4, batches=3, max_length=64, seed=5)
    assert len(batches) == 3 and all(isinstance(b, Batch) for b in batches)
    for batch in batches:
        assert batch.input_ids.shape == batch.attention_mask.shape == batch.labels.shape
        assert batch.input_ids.shape[0] == 4 and batch.input_ids.dtype == torch.long
        lengths = batch.attention_mask.sum(dim=1)
        assert lengths.max() == batch.input_ids.shape[1]  # padded to the longest, no further
        for row, length in enumerate(lengths.tolist()):
            assert (batch.input_ids[row, length:] == tok.pad_token_id).all()
            assert (batch.labels[row, length:] == -100).all()
            assert (batch.attention_mask[row, :length] == 1).all()
        expected = sum(len(e_answer) + 1 for e_answer in _answers(tok, batch))
        assert batch.target_tokens() == expected
        assert batch.to("cpu").target_tokens() == expected


def _answers(tok, batch: Batch) -> list[str]:
    """Each row's response text, read back from its labels without the end-of-turn token."""
    return [decode(tok, row.tolist()).removesuffix("<|im_end|>") for row in batch.labels]


def test_make_batches_is_deterministic_from_seed():
    tok = tiny_tokenizer()
    examples = to_examples(arithmetic_records(40, seed=0))
    first = make_batches(tok, examples, batch_size=4, batches=2, max_length=64, seed=1)
    again = make_batches(tok, examples, batch_size=4, batches=2, max_length=64, seed=1)
    other = make_batches(tok, examples, batch_size=4, batches=2, max_length=64, seed=2)
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(first, again))
    assert not all(
        a.input_ids.shape == b.input_ids.shape and torch.equal(a.input_ids, b.input_ids) for a, b in zip(first, other)
    )


def test_target_tokens_counts_after_shift():
    labels = torch.tensor([[5, 6, -100], [-100, -100, 7]])
    batch = Batch(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long), labels)
    assert batch.target_tokens() == 2


def test_make_batches_keeps_only_full_batches():
    tok = tiny_tokenizer()
    examples = to_examples(arithmetic_records(10, seed=0))
    with pytest.warns(UserWarning, match="2 batches"):
        batches = make_batches(tok, examples, batch_size=4, batches=5, max_length=64)
    assert [b.input_ids.shape[0] for b in batches] == [4, 4]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_batches(tok, examples, batch_size=4, batches=2, max_length=64)
    assert "--batch-size" in one_line_error(make_batches, tok, examples, batch_size=11, batches=1, max_length=64)


def test_make_batches_errors():
    tok = tiny_tokenizer()
    examples = to_examples(arithmetic_records(10, seed=0))
    assert "--batches must be at least 1" in one_line_error(
        make_batches, tok, examples, batch_size=2, batches=0, max_length=64
    )
    assert "--batch-size must be at least 1" in one_line_error(
        make_batches, tok, examples, batch_size=0, batches=1, max_length=64
    )
    message = one_line_error(make_batches, tok, examples, batch_size=2, batches=1, max_length=4)
    assert message == "--max-length 4 leaves no target tokens in any example: raise --max-length"


# -- splitting -------------------------------------------------------------------------------------------------------
def test_split_examples_disjoint_deduplicated_and_seeded():
    base = to_examples(arithmetic_records(50, seed=0))
    duplicated = base + [Example(prompt=e.prompt, response="other", answer="x") for e in base[:10]]
    train, validation, test = split_examples(duplicated, test=8, validation=5, seed=2)
    assert (len(train), len(validation), len(test)) == (37, 5, 8)

    def prompts(part):
        return [e.prompt[0]["content"] for e in part]

    everything = prompts(train) + prompts(validation) + prompts(test)
    assert len(everything) == len(set(everything)) == 50
    assert split_examples(duplicated, test=8, validation=5, seed=2) == (train, validation, test)
    assert split_examples(duplicated, test=8, validation=5, seed=3)[2] != test
    assert "training" in one_line_error(split_examples, base, test=30, validation=20, seed=0)


# -- the embedded model's real tokenizer, when it has been cached ---------------------------------------------------
# The tool's own cache lookup ($PLACEMENT_CACHE or ~/.cache/placement); a folder is complete once its manifest is.
REAL = sorted(str(p) for p in cache_root().glob("smollm2-135m-*") if (p / MANIFEST).is_file())


@pytest.mark.skipif(not REAL, reason="embedded model not cached")
def test_real_tokenizer_render():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(REAL[0])
    example = to_examples(ALPACA[:1])[0]
    ids, labels = render(tok, example, max_length=512)
    targets = [t for t in labels if t != -100]
    assert targets[-1] == tok.eos_token_id
    assert tok.decode(targets[:-1]).strip() == "7"
    assert ids[: len(prompt_ids(tok, example))] == prompt_ids(tok, example)


def test_a_split_rendered_again_gives_the_same_batches_and_a_changed_one_is_rendered_anew(monkeypatch):
    """The last rendered split is reused only for the same tokenizer, cut and example objects; the batches are the
    same either way."""
    from placement.data import batches as batches_mod

    tok = tiny_tokenizer()
    examples = to_examples(arithmetic_records(40, 0))
    calls = []
    render = batches_mod.render
    monkeypatch.setattr(batches_mod, "render", lambda *a: calls.append(1) or render(*a))

    def run(items, max_length=48):
        return training_batches(tok, items, steps=3, batch_size=4, max_length=max_length, seed=1)

    first = run(examples)
    assert len(calls) == 40
    again = run(list(examples))  # another list of the same example objects
    assert len(calls) == 40
    for one, two in zip(first, again):
        assert torch.equal(one.input_ids, two.input_ids) and torch.equal(one.labels, two.labels)
    changed = examples[:-1] + [to_examples(arithmetic_records(41, 0))[-1]]
    run(changed)
    assert len(calls) == 80  # one example object differs: rendered anew
    run(changed, max_length=40)
    assert len(calls) == 120  # another cut
    fresh = [type(e)(**vars(e)) for e in changed]  # equal content, new objects
    batches_mod._LAST_RENDERED.clear()
    cold = run(fresh)
    for one, two in zip(run(changed), cold):
        assert torch.equal(one.input_ids, two.input_ids)
