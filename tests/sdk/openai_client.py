"""The OpenAI Python SDK as a client of creditgate: what an SDK user sees.

Driven by tests/it/sdk.rs, which starts the gateway and the mock backend and
creates the accounts. Reads CREDITGATE_URL, RICH_KEY (an account that can pay)
and POOR_KEY (one that cannot); prints one JSON object describing what the SDK
returned for a completion, a stream and a refused request.
"""

import json
import os

import openai
from openai import OpenAI

# The mock backend's token counts, sent as extra headers (a real backend counts them).
TOKENS = {"x-mock-prompt-tokens": "15", "x-mock-completion-tokens": "15"}
MESSAGES = [{"role": "user", "content": "Say hello."}]


def main():
    base_url = os.environ["CREDITGATE_URL"] + "/v1"
    rich = OpenAI(base_url=base_url, api_key=os.environ["RICH_KEY"], max_retries=0)
    poor = OpenAI(base_url=base_url, api_key=os.environ["POOR_KEY"], max_retries=0)
    out = {}

    # A completion, with the credit headers the gateway adds.
    raw = rich.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MESSAGES, max_tokens=100, extra_headers=TOKENS
    )
    completion = raw.parse()
    out["completion"] = {
        "content": completion.choices[0].message.content,
        "usage": completion.usage.model_dump(include={"prompt_tokens", "completion_tokens"}),
        "held": raw.headers.get("x-credits-held"),
        "operation": raw.headers.get("x-credits-operation"),
    }

    # A stream, asking for the usage in its last chunk.
    stream = rich.chat.completions.create(
        model="gpt-4o-mini",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"x-mock-prompt-tokens": "10", "x-mock-completion-tokens": "20"},
    )
    chunks, text, usage = 0, "", None
    for chunk in stream:
        chunks += 1
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
        if chunk.usage is not None:
            usage = chunk.usage.model_dump(include={"prompt_tokens", "completion_tokens"})
    out["stream"] = {"chunks": chunks, "text": text, "usage": usage}

    # A request the account cannot pay.
    try:
        poor.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, extra_headers=TOKENS)
        out["refused"] = None
    except openai.APIStatusError as e:
        out["refused"] = {
            "class": type(e).__name__,
            "status": e.status_code,
            "type": e.type,
            "code": e.code,
            "message": e.message,
            "body": e.body,
        }

    print(json.dumps(out))


if __name__ == "__main__":
    main()
