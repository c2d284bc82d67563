"""Task data: load records, turn them into prompt/response examples, tokenize with loss masks, and batch.

Records come from a builtin task, a local JSON/JSONL/CSV/Parquet file or a hub dataset, in one of three shapes:
Alpaca (`instruction`, optional `input`, `output`, optional `answer`), chat (`messages`) or plain `text`.
Only the response tokens (and the end-of-turn token that closes them) are targets; the prompt is context.
"""
from __future__ import annotations

import json
import random
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import PlacementError

IGNORE = -100  # the label cross-entropy skips
DEFAULT_BUILTIN_SIZE = 4000
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
ACCEPTED_FIELDS = "instruction+output (Alpaca), messages (chat) or text"


class DataError(PlacementError):
    """A user-caused data problem; the message is one line: what is wrong and what to do."""


@dataclass(frozen=True)
class Example:
    """One training or evaluation item: a chat prompt and its response, or plain text where every token is a target."""

    prompt: list[dict] | None
    response: str | None
    text: str | None = None
    answer: str | None = None  # gold answer for exact-match scoring, when the data has one


# -- loading -------------------------------------------------------------------------------------------------------
def arithmetic_records(n: int, seed: int) -> list[dict]:
    """`n` distinct two-number sums, differences and products with exact answers, deterministic from `seed`."""
    operand_ranges = {"+": (99, 99), "-": (99, 99), "*": (12, 99)}
    capacity = sum((a + 1) * (b + 1) for a, b in operand_ranges.values())
    if n < 1 or n > capacity:
        raise DataError(f"builtin:arithmetic has {capacity} distinct questions, not {n}: pass --n between 1 and {capacity}")
    rng = random.Random(seed)
    ops = sorted(operand_ranges)
    seen: set[str] = set()
    records = []
    while len(records) < n:
        op = rng.choice(ops)
        high_a, high_b = operand_ranges[op]
        a, b = rng.randint(0, high_a), rng.randint(0, high_b)
        question = f"What is {a} {op} {b}?"
        if question in seen:
            continue
        seen.add(question)
        answer = str(a + b if op == "+" else a - b if op == "-" else a * b)
        records.append({"instruction": question, "input": "", "output": answer, "answer": answer})
    return records


BUILTINS = {"arithmetic": arithmetic_records}


def builtin_names() -> list[str]:
    return sorted(BUILTINS)


def _first_line(err: BaseException) -> str:
    """The most specific one-line reason: libraries often wrap the real parse error in a generic one."""
    while err.__cause__ is not None:
        err = err.__cause__
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _looks_like_path(spec: str) -> bool:
    """A file name rather than a hub data set: it has a file extension, starts like a path, or has more folders
    than a hub name's one `org/name` separator. A mistyped file must not be looked up on a hub."""
    has_extension = re.fullmatch(r"\.[A-Za-z][A-Za-z0-9]{0,7}", Path(spec).suffix) is not None
    return has_extension or spec.startswith((".", "/", "~")) or spec.count("/") > 1 or "\\" in spec


def _csv_as_text(path: Path) -> dict:
    """Read every CSV column as text: inferred types would turn an answer column holding 7 and a blank into 7.0."""
    import pandas as pd
    from datasets import Features, Value

    columns = pd.read_csv(path, nrows=0).columns
    return {"features": Features({name: Value("string") for name in columns})}


def _check_utf8(path: Path, spec: str) -> None:
    """A text file in another encoding is named as such, not as a parser's error; read in chunks, so a large file
    costs no memory."""
    import codecs

    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                raise DataError(f"data file {spec} is not UTF-8 text (byte {offset + err.start}): save it as UTF-8") from err
            offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as err:
        raise DataError(f"data file {spec} is not UTF-8 text (it ends inside a character): save it as UTF-8") from err


def _load_file(path: Path, spec: str):
    from datasets import load_dataset
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()  # a local file loads in a blink; its bars would only clutter error lines

    builder = FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise DataError(f"data file {spec} has unsupported extension '{path.suffix}': pass a .json, .jsonl, .csv or .parquet file")
    if path.stat().st_size == 0:
        raise DataError(f"data file {spec} is empty: pass a file with at least one record")
    if builder != "parquet":
        _check_utf8(path, spec)
    try:
        options = _csv_as_text(path) if builder == "csv" else {}
        return load_dataset(builder, data_files=str(path), split="train", **options)
    except Exception as err:  # parse errors surface as many types, from pyarrow, json and datasets
        raise DataError(f"cannot read data file {spec} as {builder.upper()}: {_first_line(err)}") from err


def _load_named(name: str):
    """A hub dataset, or a local dataset folder, which `load_dataset` reads the same way."""
    from datasets import load_dataset

    try:
        return load_dataset(name, split="train")
    except Exception as err:  # network, missing dataset and missing split all arrive as different types
        raise DataError(f"cannot load dataset '{name}': {_first_line(err)}; pass a local file or builtin:arithmetic") from err


def load_records(spec: str, *, seed: int = 0, n: int | None = None) -> list[dict]:
    """Records from `builtin:NAME`, a local data file or a hub dataset name. `n` caps the count: for a builtin it is
    the number generated (default 4000), for a file or dataset the first `n` records are kept. `seed` drives builtins."""
    if n is not None and n < 1:
        raise DataError(f"--n {n} asks for no records: pass a positive number or leave it out")
    if spec.startswith("builtin:"):
        name = spec.removeprefix("builtin:")
        if name not in BUILTINS:
            raise DataError(f"unknown builtin task '{name}': choose one of {', '.join(builtin_names())}")
        return BUILTINS[name](DEFAULT_BUILTIN_SIZE if n is None else n, seed)
    path = Path(spec).expanduser()
    if path.is_file():
        dataset = _load_file(path, spec)
    elif path.is_dir() or not _looks_like_path(spec):
        dataset = _load_named(str(path) if path.is_dir() else spec)
    else:
        raise DataError(f"data file {spec} not found: pass an existing JSON/JSONL/CSV/Parquet file, builtin:arithmetic "
                        "or a hub data set name")
    if len(dataset) == 0:
        raise DataError(f"{spec} holds no records: pass data with at least one record")
    if n is not None:
        dataset = dataset.select(range(min(n, len(dataset))))
    return dataset.to_list()


# -- records to examples -------------------------------------------------------------------------------------------
def _present(record: dict, key: str) -> bool:
    """Columnar formats fill a field missing from one record with None, so None counts as absent."""
    return record.get(key) is not None


def _optional_text(value) -> str | None:
    # JSON and Parquet fields may hold numbers; answers are compared as text, and a blank answer is no answer.
    return None if value is None or value == "" else str(value)


def _from_alpaca(record: dict) -> Example:
    content = str(record["instruction"])
    extra = _optional_text(record.get("input"))
    if extra:
        content += "\n\n" + extra
    return Example(
        prompt=[{"role": "user", "content": content}],
        response=str(record["output"]),
        answer=_optional_text(record.get("answer")),
    )


def _from_chat(record: dict, index: int) -> Example:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages or not all(isinstance(m, Mapping) for m in messages):
        raise DataError(f"record {index}: 'messages' must be a non-empty list of {{role, content}} objects")
    messages = [{"role": str(m.get("role")), "content": str(m.get("content") or "")} for m in messages]
    if messages[-1]["role"] != "assistant" or len(messages) < 2:
        raise DataError(f"record {index}: the last message must be the assistant's response after at least one other message")
    return Example(prompt=messages[:-1], response=messages[-1]["content"], answer=_optional_text(record.get("answer")))


def to_examples(records: list[dict]) -> list[Example]:
    """Alpaca, chat or plain-text records to examples; a record of none of these shapes is an error."""
    examples = []
    for index, record in enumerate(records):
        if _present(record, "messages"):
            examples.append(_from_chat(record, index))
        elif _present(record, "instruction") and _present(record, "output"):
            examples.append(_from_alpaca(record))
        elif _present(record, "text"):
            examples.append(Example(prompt=None, response=None, text=str(record["text"])))
        else:
            found = ", ".join(k for k in record if _present(record, k)) or "none"
            raise DataError(f"record {index} has fields {found}: give each record {ACCEPTED_FIELDS}")
    return examples


# -- tokenizing ----------------------------------------------------------------------------------------------------
def _as_ids(output) -> list[int]:
    """apply_chat_template returns a list or, in recent transformers, a BatchEncoding."""
    if isinstance(output, Mapping):
        output = output["input_ids"]
    if hasattr(output, "tolist"):
        output = output.tolist()
    return [int(i) for i in output]


def _chat_ids(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    from jinja2 import TemplateError

    try:
        out = tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
        )
    except TemplateError as err:  # e.g. a template that refuses a system message
        raise DataError(f"the tokenizer's chat template rejects these messages: {_first_line(err)}") from err
    return _as_ids(out)


def _alpaca_prompt(messages: list[dict]) -> str:
    """The Alpaca layout for tokenizers without a chat template; a lone user turn gives the classic form."""
    headers = {"user": "### Instruction:\n", "assistant": "### Response:\n", "system": ""}
    parts = [headers.get(m["role"], "### Instruction:\n") + m["content"] for m in messages]
    return "\n\n".join(parts) + "\n\n### Response:\n"


def _text_ids(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def prompt_ids(tokenizer, example: Example) -> list[int]:
    """The ids a model is given to generate the response."""
    if example.prompt is None:
        raise DataError("plain-text records have no prompt to generate from: use Alpaca or chat records for evaluation")
    if getattr(tokenizer, "chat_template", None):
        return _chat_ids(tokenizer, example.prompt, add_generation_prompt=True)
    # The tokenizer's defaults decide whether a bos token starts the text.
    return _text_ids(tokenizer, _alpaca_prompt(example.prompt), special=True)


def _response_ids(tokenizer, example: Example, prompt: list[int]) -> list[int]:
    """The response tokens through the first end-of-turn token; what a template adds after it is not a target."""
    eos = tokenizer.eos_token_id
    if getattr(tokenizer, "chat_template", None):
        turn = {"role": "assistant", "content": example.response}
        full = _chat_ids(tokenizer, example.prompt + [turn], add_generation_prompt=False)
        if full[: len(prompt)] == prompt:
            response = full[len(prompt):]
            if eos in response:
                return response[: response.index(eos) + 1]
            return response
        # The template renders earlier turns differently once a response follows, so the prompt is not a prefix.
    response = _text_ids(tokenizer, example.response, special=False)
    return response + ([eos] if eos is not None else [])


def render(tokenizer, example: Example, max_length: int) -> tuple[list[int], list[int]] | None:
    """(input_ids, labels) with labels -100 off target, cut to `max_length`; None when no target survives the cut.

    Labels are aligned with input_ids; the loss shifts them, so the first token can never count as a target.
    """
    if example.text is not None:
        ids = _text_ids(tokenizer, example.text, special=True)
        labels = list(ids)
    else:
        context = prompt_ids(tokenizer, example)
        response = _response_ids(tokenizer, example, context)
        ids = context + response
        labels = [IGNORE] * len(context) + response
    ids, labels = ids[:max_length], labels[:max_length]
    if all(label == IGNORE for label in labels[1:]):
        return None
    return ids, labels


# -- batching ------------------------------------------------------------------------------------------------------
@dataclass
class Batch:
    """Right-padded tensors; labels are aligned with input_ids (not shifted) and -100 where not a target."""

    input_ids: torch.LongTensor  # (B, T)
    attention_mask: torch.LongTensor  # (B, T)
    labels: torch.LongTensor  # (B, T)

    def target_tokens(self) -> int:
        """Target tokens after the causal shift, i.e. those the loss is taken over."""
        return int((self.labels[:, 1:] != IGNORE).sum())

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))


def pad_token_id(tokenizer) -> int:
    # Padding is masked out of attention and loss, so any valid id works when a tokenizer names none.
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def collate(rendered: list[tuple[list[int], list[int]]], pad_id: int) -> Batch:
    width = max(len(ids) for ids, _ in rendered)
    shape = (len(rendered), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    labels = torch.full(shape, IGNORE, dtype=torch.long)
    for row, (ids, labs) in enumerate(rendered):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
        labels[row, : len(labs)] = torch.tensor(labs, dtype=torch.long)
    return Batch(input_ids, attention_mask, labels)


def make_batches(
    tokenizer, examples: list[Example], *, batch_size: int, batches: int, max_length: int, seed: int = 0
) -> list[Batch]:
    """`batches` full batches of `batch_size` examples, drawn in a seeded order; examples without targets are skipped.

    Batches are never partial: every batch weighs the same in per-batch statistics.
    """
    if batches < 1:
        raise DataError(f"--batches {batches} asks for nothing: --batches must be at least 1")
    if batch_size < 1:
        raise DataError(f"--batch-size {batch_size} is empty: --batch-size must be at least 1")
    if not examples:
        raise DataError("no examples to batch: pass data with at least one record")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    wanted = batches * batch_size
    rendered = []
    for index in order:  # rendering stops once there is enough, so large data sets cost only what is used
        item = render(tokenizer, examples[index], max_length)
        if item is not None:
            rendered.append(item)
            if len(rendered) == wanted:
                break
    if not rendered:
        raise DataError(f"--max-length {max_length} leaves no target tokens in any example: raise --max-length")
    full = len(rendered) // batch_size
    if full == 0:
        raise DataError(
            f"only {len(rendered)} examples have target tokens, fewer than --batch-size {batch_size}: "
            "lower --batch-size or add data"
        )
    if full < batches:
        warnings.warn(f"only {len(rendered)} usable examples: making {full} batches of {batch_size}, not {batches}")
    pad_id = pad_token_id(tokenizer)
    return [collate(rendered[i * batch_size:(i + 1) * batch_size], pad_id) for i in range(full)]


# -- splitting -----------------------------------------------------------------------------------------------------
def prompt_key(example: Example) -> str:
    """The text that decides whether two examples ask the same thing."""
    if example.prompt is None:
        return example.text or ""
    return json.dumps(example.prompt, sort_keys=True, ensure_ascii=False)


def held_out_sizes(distinct: int, test: int | None, validation: int | None) -> tuple[int, int]:
    """Test and validation sizes for `distinct` prompts. What the user set is kept; what they did not is sized to the
    data: 10% each (capped at 100 test and 64 validation), at least one each while training keeps at least one
    example, none when it would not."""
    def share(cap: int, left: int) -> int:
        n = min(cap, max(1, distinct // 10))
        return n if left - n >= 1 else 0

    if test is None:
        test = share(100, distinct - (validation or 0))
    if validation is None:
        validation = share(64, distinct - test)
    return test, validation


def split_examples(
    examples: list[Example], *, test: int | None, validation: int | None, seed: int
) -> tuple[list[Example], list[Example], list[Example]]:
    """(train, validation, test): disjoint, one example per distinct prompt, in a seeded order. A size of None is
    sized to the data (`held_out_sizes`).

    Keeping one copy of each prompt means a question can never be trained on and then scored.
    """
    if (test or 0) < 0 or (validation or 0) < 0:
        raise DataError(f"--test {test} and --validation {validation} must not be negative")
    unique: dict[str, Example] = {}
    for example in examples:
        unique.setdefault(prompt_key(example), example)
    test, validation = held_out_sizes(len(unique), test, validation)
    if test + validation >= len(unique):
        raise DataError(
            f"--test {test} plus --validation {validation} leaves none of {len(unique)} distinct prompts "
            "for training: lower them or add data"
        )
    keys = list(unique)
    random.Random(seed).shuffle(keys)
    chosen = [unique[k] for k in keys]
    return chosen[test + validation:], chosen[test:test + validation], chosen[:test]


def _render_all(tokenizer, examples: list[Example], max_length: int) -> list[tuple[list[int], list[int]]]:
    rendered = [item for item in (render(tokenizer, e, max_length) for e in examples) if item is not None]
    if not rendered:
        raise DataError(f"--max-length {max_length} leaves no target tokens in any example: raise --max-length")
    return rendered


def training_batches(
    tokenizer, examples: list[Example], *, steps: int, batch_size: int, max_length: int, seed: int = 0
) -> list[Batch]:
    """One full batch per training step, epoch after epoch, each epoch in its own seeded order.

    The sequence depends only on the examples and the seed, so every arm of a comparison sees the same data in the
    same order, and a resumed run picks up at its step index.
    """
    if steps < 1:
        raise DataError(f"--steps {steps} trains nothing: pass at least 1")
    if batch_size < 1:
        raise DataError(f"--batch-size {batch_size} is empty: --batch-size must be at least 1")
    rendered = _render_all(tokenizer, examples, max_length)
    if len(rendered) < batch_size:
        raise DataError(
            f"only {len(rendered)} training examples have target tokens, fewer than --batch-size {batch_size}: "
            "lower --batch-size or add data"
        )
    pad_id = pad_token_id(tokenizer)
    per_epoch = len(rendered) // batch_size
    batches, epoch = [], 0
    while len(batches) < steps:
        order = list(range(len(rendered)))
        random.Random(seed * 100_003 + epoch).shuffle(order)
        for i in range(min(per_epoch, steps - len(batches))):
            batches.append(collate([rendered[j] for j in order[i * batch_size:(i + 1) * batch_size]], pad_id))
        epoch += 1
    return batches


def eval_batches(tokenizer, examples: list[Example], *, batch_size: int, max_length: int) -> list[Batch]:
    """Every example with a target, in the given order; the last batch may be partial."""
    rendered = _render_all(tokenizer, examples, max_length)
    pad_id = pad_token_id(tokenizer)
    return [collate(rendered[i:i + batch_size], pad_id) for i in range(0, len(rendered), batch_size)]


def left_padded_prompts(tokenizer, examples: list[Example]) -> tuple[torch.LongTensor, torch.LongTensor]:
    """Prompt ids padded on the left, as generation needs: every row's next token comes at the same position."""
    prompts = [prompt_ids(tokenizer, e) for e in examples]
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id(tokenizer), dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids):] = 1
    return input_ids, attention_mask


def task_splits(
    examples: list[Example], eval_examples: list[Example] | None = None, *, test: int | None = None,
    validation: int | None = None, seed: int = 0,
) -> tuple[list[Example], list[Example], list[Example]]:
    """(train, validation, test) for a training run. Without `eval_examples` all three are held out from `examples`;
    with them, the test split is up to `test` distinct prompts of `eval_examples` (all when `test` is None), and every
    training example asking one of those prompts is dropped, so no test question is ever trained on. Sizes left None
    are sized to the data (`held_out_sizes`)."""
    if eval_examples is None:
        return split_examples(examples, test=test, validation=validation, seed=seed)
    held: dict[str, Example] = {}
    for example in eval_examples:
        held.setdefault(prompt_key(example), example)
    keys = list(held)
    random.Random(seed).shuffle(keys)
    keys = keys[:test] if test is not None else keys
    if not keys:
        raise DataError("the evaluation data holds no usable example: pass --eval-data with records, or a positive --test")
    excluded = set(keys)
    pool = [e for e in examples if prompt_key(e) not in excluded]
    train, val, _ = split_examples(pool, test=0, validation=validation, seed=seed)
    return train, val, [held[k] for k in keys]
