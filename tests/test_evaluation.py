import torch

from matryoshka_sae.cli import demo, main
from matryoshka_sae.config import compute_fvu, get_default_cfg, post_init_cfg
from matryoshka_sae.evaluation import (
    format_report,
    plot_firing_density,
    plot_prefix_fvu,
    reconstruction_report,
)
from matryoshka_sae.sae import create_sae


def small_sae(sae_type="matryoshka"):
    cfg = get_default_cfg()
    cfg.update(
        model_name="synthetic",
        act_size=16,
        dict_size=128,
        group_sizes=None,
        top_k=4,
        batch_size=64,
        sae_type=sae_type,
        device="cpu",
    )
    return create_sae(post_init_cfg(cfg))


def test_report_matches_a_single_pass_and_counts_latents():
    sae = small_sae()
    x = torch.randn(300, 16) * 3 + 1
    sae(x[:64])  # learn a threshold for eval mode
    report = reconstruction_report(sae, x, chunk_size=64)  # several chunks
    assert sae.training  # mode restored
    sae.eval()
    with torch.no_grad():
        out = sae(x)
    assert abs(report["fvu"] - compute_fvu(x, out["sae_out"]).item()) < 1e-5
    assert len(report["fvu_per_prefix"]) == 4 and report["fvu_per_prefix"][-1] == report["fvu"]
    density = (out["feature_acts"] > 0).float().mean(0)
    torch.testing.assert_close(report["firing_density"], density)
    assert report["dead_fraction"] == (density == 0).float().mean().item()
    assert abs(report["l0_norm"] - (out["feature_acts"] > 0).sum(1).float().mean().item()) < 1e-5


def test_report_text_and_plots(tmp_path):
    sae = small_sae("batchtopk")
    x = torch.randn(200, 16)
    sae(x)
    report = reconstruction_report(sae, x)
    ce = {
        "ce_loss_clean": 2.0,
        "ce_loss_spliced": 2.1,
        "ce_loss_zero_ablation": 6.0,
        "ce_loss_mean_ablation": 5.0,
        "loss_recovered": 0.975,
    }
    text = format_report(report, ce)
    assert "FVU (full dictionary)" in text and "97.5%" in text
    history = [
        {"step": s, "fvu": 1 / (s + 1), **{f"fvu_prefix_{g}": 1 / (s + 1 + g) for g in range(4)}}
        for s in range(10)
    ]
    for path in (
        plot_prefix_fvu(history, tmp_path / "fvu.png"),
        plot_firing_density(report["firing_density"], tmp_path / "density.png"),
    ):
        assert path.read_bytes()[:4] == b"\x89PNG"


def test_demo_runs_end_to_end_on_a_tiny_model(monkeypatch, tmp_path, tiny_gpt2, capsys):
    from datasets import Dataset

    tokens = torch.randint(2, 1000, (400, 64), generator=torch.Generator().manual_seed(0)).tolist()
    monkeypatch.setitem(demo.DEMO_SETTINGS, "model_name", "synthetic")
    monkeypatch.setitem(demo.DEMO_SETTINGS, "act_size", 64)
    monkeypatch.setitem(demo.DEMO_SETTINGS, "layer", 1)
    monkeypatch.setitem(demo.DEMO_SETTINGS, "dict_size", 256)
    monkeypatch.setitem(demo.DEMO_SETTINGS, "bos_token_id", 1)
    monkeypatch.setitem(demo.DEMO_SETTINGS, "dataset_path", Dataset.from_dict({"tokens": tokens}))
    monkeypatch.setitem(demo.DEMO_SETTINGS, "model_batch_size", 8)
    monkeypatch.setitem(demo.DEMO_SETTINGS, "wandb_mode", "disabled")
    monkeypatch.setattr(
        "matryoshka_sae.model_loading.load_model", lambda *args, **kwargs: tiny_gpt2
    )
    monkeypatch.setattr(
        "matryoshka_sae.model_loading.check_model_available", lambda name: None
    )  # the stand-in is there
    args = main.build_parser().parse_args(
        ["--demo", "--num-tokens", "6144", "--batch-size", "512", "--checkpoint-dir", str(tmp_path)]
    )
    result = demo.run_demo(args)
    printed = capsys.readouterr().out
    assert "CE loss recovered" in printed and "prefix" in printed
    assert len(result["fvu_per_prefix"]) == 4
    assert 0 < result["fvu"] < 1.5 and result["loss_recovered"] > 0
    folder = tmp_path / result["folder"].split("/")[-1]
    assert (folder / "prefix_fvu.png").exists() and (folder / "firing_density.png").exists()
    assert (folder / "sae.safetensors").exists()
