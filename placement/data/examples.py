"""Records to prompt/response examples, and examples to token ids with loss masks.

Only the response tokens (and the end-of-turn token that closes them) are targets; the prompt is context.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .records import DataError, _first_line, load_records

IGNORE = -100  # the label cross-entropy skips
ACCEPTED_FIELDS = "instruction+output (Alpaca), messages (chat) or text"


@dataclass(frozen=True)
class Example:
    """One training or evaluation item: a chat prompt and its response, or plain text where every token is a target."""

    prompt: list[dict] | None
    response: str | None
    text: str | None = None
    answer: str | None = None  # gold answer for exact-match scoring, when the data has one


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


def load_examples(spec: str, seed: int = 0) -> list[Example]:
    """The examples of a data source (see `load_records` for the forms it takes)."""
    return to_examples(load_records(spec, seed=seed))
