"""Run in circuit-tracer's environment (.ct-venv) by test_trace_circuit.py.

    python tests/smollm2_check.py PROMPT OUT_FILE

Loads SmolLM2 with the library's loader (as trace_circuit.py does there), tokenizes PROMPT as a
traced prompt (BOS first) and saves the tokens and the model's logits to OUT_FILE. Prints one JSON
line: the tokenizer's settings and trace_circuit's verdict on the model (`masked_prompt_error`).
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from matryoshka_sae.cli.trace_circuit import prompt_tokens  # noqa: E402
from matryoshka_sae.model_loading import load_model, masked_prompt_error  # noqa: E402


def main() -> None:
    prompt, out_file = sys.argv[1:]
    model = load_model("smollm2-135m", "cpu", torch.float32)
    tokens = prompt_tokens(model, prompt)
    with torch.no_grad():
        logits = model(tokens[None])
    torch.save({"tokens": tokens, "logits": logits}, out_file)
    tokenizer = model.tokenizer
    print(
        json.dumps(
            {
                "padding_side": tokenizer.padding_side,
                "eos_token": tokenizer.eos_token,
                "pad_token": tokenizer.pad_token,
                "masked_prompt_error": masked_prompt_error(model, tokens),
            }
        )
    )


if __name__ == "__main__":
    main()
