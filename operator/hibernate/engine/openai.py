"""OpenAI-shaped request parsing and response bodies, as vLLM's OpenAI server writes them."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

DEFAULT_MAX_TOKENS = 16


class BadRequest(ValueError):
    """A request the server refuses with 400 (or `status`) and an OpenAI-style error body."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def error_body(message: str, status: int) -> dict[str, Any]:
    kind = {400: "BadRequestError", 404: "NotFoundError"}.get(status, "InternalServerError")
    return {"error": {"message": message, "type": kind, "param": None, "code": status}}


@dataclass(frozen=True)
class Request:
    chat: bool
    prompts: list[str]
    max_tokens: int
    stream: bool
    id: str
    created: int


def parse_request(body: object, chat: bool, served_names: tuple[str, ...]) -> Request:
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model not in served_names:
        raise BadRequest(f"The model `{model}` does not exist.", status=404)
    prompts = [_chat_prompt(body.get("messages"))] if chat else _prompts(body.get("prompt"))
    max_tokens = body.get("max_completion_tokens") if chat else None
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    if max_tokens is None:
        max_tokens = DEFAULT_MAX_TOKENS
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise BadRequest("max_tokens must be a positive integer")
    prefix = "chatcmpl" if chat else "cmpl"
    return Request(
        chat=chat,
        prompts=prompts,
        max_tokens=max_tokens,
        stream=bool(body.get("stream", False)),
        id=f"{prefix}-{uuid.uuid4().hex}",
        created=int(time.time()),
    )


def _prompts(prompt: object) -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    raise BadRequest("prompt must be a string or a non-empty list of strings")


def _chat_prompt(messages: object) -> str:
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list")
    lines = []
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadRequest("each message needs a role")
        lines.append(f"{message['role']}: {_text(message.get('content'))}")
    return "\n".join(lines)


def _text(content: object) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    raise BadRequest("message content must be a string or a list of parts")


def full_response(
    req: Request, model: str, outputs: list[list[str]], finish: str, prompt_tokens: int
) -> dict[str, Any]:
    choices = []
    for index, tokens in enumerate(outputs):
        text = "".join(tokens)
        if req.chat:
            choices.append(
                {
                    "index": index,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": finish,
                }
            )
        else:
            choices.append({"index": index, "text": text, "logprobs": None, "finish_reason": finish})
    completion_tokens = sum(len(tokens) for tokens in outputs)
    return {
        "id": req.id,
        "object": "chat.completion" if req.chat else "text_completion",
        "created": req.created,
        "model": model,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def chunk(req: Request, model: str, index: int, token: str | None, finish: str | None) -> dict[str, Any]:
    """One streamed chunk; `token` None with a `finish` reason ends a choice."""
    if req.chat:
        delta: dict[str, Any] = {} if token is None else {"content": token}
        choice: dict[str, Any] = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
    else:
        choice = {"index": index, "text": token or "", "logprobs": None, "finish_reason": finish}
    return {
        "id": req.id,
        "object": "chat.completion.chunk" if req.chat else "text_completion",
        "created": req.created,
        "model": model,
        "choices": [choice],
    }


def role_chunk(req: Request, model: str, index: int) -> dict[str, Any]:
    """The first chat chunk of a choice, which carries only the role."""
    body = chunk(req, model, index, "", None)
    body["choices"][0]["delta"] = {"role": "assistant", "content": ""}
    return body


def count_tokens(prompts: list[str]) -> int:
    return sum(len(prompt.split()) for prompt in prompts)
