"""What a transcoder set costs on a GPU, computed (not measured): memory per layer and for the whole
set with Adam and the activation buffers, and the arithmetic a token costs next to the model's.

    python benchmarks/set_sizes.py        # -> benchmarks/results/set_sizes.json

Memory comes from the library's own estimate (`cli.options.training_memory`, the figure the scripts
check against the device before loading the model): float32 weights, gradients and Adam's two
moments, and each layer's source and target rows of the buffer. FLOPs a token: the model's forward
is 2 N for N parameters; a layer's transcoder step is its dense encoder forward (2 d S) plus the
sparse work of the k selected latents of each token (the encoder's weight gradient, the decode and
the decoder's gradient: 3 x 2 k d; the input needs no gradient). The ratio is the floor of what a
set adds to the model's forward where both run at the same FLOP rate and the buffer never stalls.
"""

from __future__ import annotations

import harness  # noqa: F401  (first: import paths)

# (name in the model table, latents per layer, k per layer, model parameters from its config)
CASES = [
    ("smollm2-135m", 1152, 16, 134_515_008),
    ("smollm2-135m", 4608, 32, 134_515_008),
    ("gpt2", 12288, 32, 124_439_808),
    ("gpt2", 24576, 64, 124_439_808),
    ("gemma-2-2b", 16384, 64, 2_614_341_888),
    ("gemma-2-2b", 65536, 64, 2_614_341_888),
]
BATCH_SIZE = 4096
BUFFER_BATCHES = 8


def case_row(model: str, latents: int, k: int, model_parameters: int) -> dict:
    from matryoshka_sae.cli.options import training_memory
    from matryoshka_sae.config import get_model_config, post_init_cfg
    from matryoshka_sae.transcoder_set import default_set_cfg, transcoder_set_cfgs

    n_layers, d = get_model_config(model)["n_layers"], get_model_config(model)["act_size"]
    base = post_init_cfg(
        default_set_cfg(
            model_name=model,
            dict_size=latents,
            top_k=k,
            batch_size=BATCH_SIZE,
            num_batches_in_buffer=BUFFER_BATCHES,
            device="cpu",
        )
    )
    cfgs = transcoder_set_cfgs(base, range(n_layers), "unused")
    one, whole = training_memory(cfgs[:1]), training_memory(cfgs)
    set_flops = n_layers * (2 * d * latents + 3 * 2 * k * d)
    return {
        "model": model,
        "layers": n_layers,
        "d_model": d,
        "latents_per_layer": latents,
        "k": k,
        "layer_train_gib": round(one["dictionaries"] / 2**30, 3),
        "layer_buffer_gib": round(one["buffer"] / 2**30, 3),
        "set_train_gib": round(whole["dictionaries"] / 2**30, 2),
        "set_buffer_gib": round(whole["buffer"] / 2**30, 2),
        "model_bf16_gib": round(2 * model_parameters / 2**30, 2),
        "set_step_flops_vs_model_forward": round(set_flops / (2 * model_parameters), 3),
    }


def main() -> None:
    rows = [case_row(*case) for case in CASES]
    for row in rows:
        print(row)
    harness.save(
        "set_sizes",
        "A transcoder set's memory and arithmetic, computed (every layer, Matryoshka, float32 Adam)",
        rows,
        {
            "batch_size": BATCH_SIZE,
            "num_batches_in_buffer": BUFFER_BATCHES,
            "source": "ln2_normalized",
        },
        notes="Computed from the settings, not measured. *_train_gib: weights, gradients and Adam's two "
        "moments in float32 (16 bytes a parameter); *_buffer_gib: the float32 activation buffer of "
        "source and target rows, (num_batches_in_buffer + 1) batches; model_bf16_gib: the model's "
        "weights in bfloat16. set_step_flops_vs_model_forward: the set's dense encoder forward and the "
        "sparse work of the selected latents (2 d S + 6 k d a layer and token) over the model's "
        "forward (2 N).",
    )


if __name__ == "__main__":
    main()
