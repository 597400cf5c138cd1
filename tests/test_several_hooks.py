"""Dictionaries at several hooks from one model pass (MultiHookActivationsStore, main.py --layers)."""

import torch
from datasets import Dataset
from helpers import direct_activations, make_cfg, match_rows, run_args, without_bos

from matryoshka_sae.activation_store import ActivationsStore, MultiHookActivationsStore
from matryoshka_sae.checkpoint import checkpoint_folder, load_metrics
from matryoshka_sae.cli import main
from matryoshka_sae.config import post_init_cfg
from matryoshka_sae.sae import create_sae
from matryoshka_sae.training import train_sae, train_sae_group
from matryoshka_sae.transcoder_activation_store import create_transcoder_config


def layer_cfg(token_rows, layer, tmp_path, **overrides):
    data = Dataset.from_dict({"tokens": without_bos(token_rows).tolist()})
    settings = dict(
        layer=layer,
        site="resid_post",
        dict_size=256,
        top_k=8,
        num_tokens=64 * 12,
        checkpoint_freq=5,
        checkpoint_dir=str(tmp_path),
        wandb_mode="disabled",
        seed=1,
    )
    return make_cfg(data, **{**settings, **overrides})


def test_batches_of_every_hook_come_from_the_same_tokens(tiny_gemma2, token_rows, tmp_path):
    cfgs = [layer_cfg(token_rows, 0, tmp_path), layer_cfg(token_rows, 1, tmp_path)]
    transcoder = create_transcoder_config(cfgs[0], 1, 1, "resid_mid", "mlp_out")
    store = MultiHookActivationsStore(tiny_gemma2, [*cfgs, transcoder])
    assert store.hook_names == [
        "blocks.0.hook_resid_post",
        "blocks.1.hook_resid_post",
        "blocks.1.hook_resid_mid",
        "blocks.1.hook_mlp_out",
    ]
    assert store.stop_at_layer == 2
    batch = store.next_batch()
    rows = without_bos(token_rows)[4:]
    index = [
        match_rows(batch[name], direct_activations(tiny_gemma2, rows, name, layer=int(name[7])))
        for name in (
            "blocks.0.hook_resid_post",
            "blocks.1.hook_resid_post",
            "blocks.1.hook_mlp_out",
        )
    ]
    assert torch.equal(index[0], index[1]) and torch.equal(index[0], index[2])


def test_trained_together_equals_trained_alone(tiny_gpt2, token_rows, tmp_path):
    cfgs = [layer_cfg(token_rows, layer, tmp_path / "together") for layer in (0, 1)]
    torch.manual_seed(0)
    together = train_sae_group(
        [create_sae(cfg) for cfg in cfgs], MultiHookActivationsStore(tiny_gpt2, cfgs), None, cfgs
    )
    for cfg, sae in zip(cfgs, together):
        alone_cfg = post_init_cfg({**cfg, "checkpoint_dir": str(tmp_path / "alone")})
        torch.manual_seed(0)
        alone = train_sae(
            create_sae(alone_cfg), ActivationsStore(tiny_gpt2, alone_cfg), None, alone_cfg
        )
        for name, tensor in alone.state_dict().items():
            assert torch.equal(sae.state_dict()[name], tensor), (cfg["hook_point"], name)


def test_main_trains_every_layer_from_one_pass(tmp_path, token_rows, tiny_models):  # noqa: F811
    args = [
        "--model",
        "tiny-gpt2",
        "--sae-type",
        "matryoshka",
        "--layers",
        "0",
        "1",
        *run_args(tmp_path, token_rows, tmp_path / "checkpoints"),
    ]
    args[args.index("--layer") : args.index("--layer") + 2] = []
    main.main(args)
    cfgs = main.build_cfgs(main.build_parser().parse_args(args))
    assert [cfg["hook_point"] for cfg in cfgs] == [
        "blocks.0.hook_resid_pre",
        "blocks.1.hook_resid_pre",
    ]
    assert all(load_metrics(checkpoint_folder(cfg))["step"] == 24 for cfg in cfgs)
