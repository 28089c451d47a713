"""`tether demo --quick` end to end, the report it writes, and its rendering in Chromium."""

import json
import shutil
import subprocess

import pytest

from tether.cli import main

SUMMARY_KEYS = ("rm_accuracy_gold", "rm_accuracy_labels", "win_rate_ppo_vs_sft", "win_rate_dpo_vs_sft",
                "win_rate_bon_vs_sft", "win_rate_ppo_beta0_vs_sft", "win_rate_online_dpo_vs_sft", "kl_ppo",
                "kl_dpo", "kl_online_dpo", "gold_ppo", "gold_online_dpo",
                "gold_sft", "wall_seconds", "quiz_exact_match_sft", "quiz_exact_match_grpo",
                "quiz_exact_match_rloo", "kl_grpo", "kl_rloo", "lookup_exact_match_sft",
                "lookup_exact_match_grpo_no_tool", "lookup_exact_match_grpo_tool", "lookup_tool_call_rate_sft",
                "lookup_tool_call_rate_grpo_tool")


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    assert main(["demo", "--quick", "--rounds", "2", "--output-dir", str(out)]) == 0
    return out


def test_quick_demo_writes_every_summary_figure(demo_dir):
    summary = json.loads((demo_dir / "summary.json").read_text())
    for key in SUMMARY_KEYS:
        assert isinstance(summary[key], (int, float)), key
    for key in ("win_rate_ppo_vs_sft", "win_rate_dpo_vs_sft", "win_rate_bon_vs_sft", "rm_accuracy_gold"):
        assert 0.0 <= summary[key] <= 1.0
    for key in ("quiz_exact_match_sft", "quiz_exact_match_grpo", "quiz_exact_match_rloo",
                "lookup_exact_match_sft", "lookup_exact_match_grpo_tool", "lookup_tool_call_rate_grpo_tool"):
        assert 0.0 <= summary[key] <= 1.0
    assert 0.0 <= summary["lookup_exact_match_grpo_no_tool"] <= 1.0
    grpo_tool = [json.loads(line) for line in (demo_dir / "grpo_tool" / "metrics.jsonl").read_text().splitlines()]
    assert all(0.0 <= row["env/observation_token_frac"] < 1.0 and row["env/turns"] >= 1 for row in grpo_tool)
    for stage in ("base", "sft", "rm", "ppo", "ppo_beta0", "dpo", "online_dpo", "sft_quiz", "grpo", "rloo",
                  "sft_lookup", "grpo_no_tool", "grpo_tool"):
        assert json.loads((demo_dir / stage / "tether_run.json").read_text())["complete"] is True
    assert (demo_dir / "bon" / "bon.jsonl").exists()


def test_a_second_round_retrains_the_rm_on_the_round1_policy_and_repeats_the_stress_test(demo_dir):
    import yaml

    iterated = json.loads((demo_dir / "summary.json").read_text())["iterated"]
    assert iterated["rounds"] == 2
    for key in ("rm_accuracy_on_new_samples_before", "rm_accuracy_on_new_samples_after",
                "rm_accuracy_gold_on_new_samples_before", "rm_accuracy_gold_on_new_samples_after",
                "win_rate_last_round_vs_round1"):
        assert 0.0 <= iterated[key] <= 1.0, key
    summary = json.loads((demo_dir / "summary.json").read_text())
    assert iterated["beta0_gold_loss_first_rm"] == pytest.approx(summary["gold_sft"] - summary["gold_ppo_beta0"])
    assert iterated["gold_round1"] == summary["gold_ppo"]
    round_dir = demo_dir / "iterate" / "round-1"
    ppo = yaml.safe_load((round_dir / "ppo" / "config.yaml").read_text())
    assert ppo["policy"] == str(demo_dir / "ppo") and ppo["reference"] == str(demo_dir / "sft")
    stress = yaml.safe_load((demo_dir / "ppo_beta0_round2" / "config.yaml").read_text())
    assert stress["reward_model"] == str(round_dir / "rm") and stress["kl_coef"] == 0.0
    # the new RM was trained on the first rankings and the round-1 policy's ranked samples
    rankings = (demo_dir / "pairs" / "rankings.jsonl").read_text().splitlines()
    trained = (round_dir / "rm_data.jsonl").read_text().splitlines()
    assert len(trained) > len(rankings)
    assert "Iterated RLHF" in (demo_dir / "report.html").read_text()


def test_demo_ranks_sft_samples_and_tests_on_labelled_pairs_that_keep_gold(demo_dir):
    rankings = [json.loads(line) for line in (demo_dir / "pairs" / "rankings.jsonl").open()]
    assert rankings
    for row in rankings:
        k = len(row["responses"])
        assert 2 <= k <= 4 and len(set(row["responses"])) == k and all(r.strip() for r in row["responses"])
        assert sorted(row["ranks"]) == list(range(k)) and len(row["gold"]) == k
    from tether.world import score

    pairs = [json.loads(line) for line in (demo_dir / "pairs" / "pairs_eval.jsonl").open()]
    assert pairs
    for p in pairs:  # ordered by the noisy labeler; gold ties are left out, gold kept per response
        assert p["gold_chosen"] == score(p["prompt"], p["chosen"])
        assert p["gold_rejected"] == score(p["prompt"], p["rejected"])
        assert p["gold_chosen"] != p["gold_rejected"]


def test_demo_rerun_skips_finished_stages(demo_dir, capsys):
    before = (demo_dir / "sft" / "model.safetensors").stat().st_mtime_ns
    assert main(["demo", "--quick", "--output-dir", str(demo_dir)]) == 0
    assert (demo_dir / "sft" / "model.safetensors").stat().st_mtime_ns == before


def test_report_is_self_contained_with_plots(demo_dir):
    html = (demo_dir / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 3
    assert "Samples side by side" in html and "win_rate_ppo_vs_sft" in html
    for png in ("ppo_curves.png", "win_rates.png", "losses.png"):
        assert (demo_dir / png).stat().st_size > 1000


def test_report_renders_in_headless_chromium(demo_dir, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("Chromium is not installed (apt-get install chromium); the report is not rendered")
    shot = tmp_path / "report.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,2400",
                    f"--screenshot={shot}", (demo_dir / "report.html").as_uri()],
                   capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 50_000  # a blank page is a few KB
