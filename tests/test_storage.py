"""Run folders in a bucket, against a real S3 API server on 127.0.0.1 (moto's)."""

import json

import boto3
import pytest
from helpers import bucket_keys, stop_at_the_first_test_probability

from ctscan.cli import main
from data_utils import runfolder
from data_utils.demo import make_demo_data
from results.wording import md_text

# The second trial's weights file is missing, as on an autoscaled worker without it: it fails
# before its first report.
FAILING_SPACE = """
start_with: [{}, {weights: /nonexistent/resnet18.pt}]
weights: {choice: [none, /nonexistent/resnet18.pt]}
lr: {loguniform: [1.0e-4, 1.0e-2]}
"""
TUNE = ["--num-samples", "2", "--max-epochs", "1", "--grace-period", "1", "--image-size", "32",
        "--group-by", "none", "--ratios", "0.6", "0.2", "0.2", "--max-failures", "0",
        "--bootstrap", "200"]


def _read(uri: str) -> bytes:
    bucket, key = uri.removeprefix("s3://").split("/", 1)
    return boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()


def test_a_search_in_a_bucket_leaves_everything_there_and_survives_a_failing_trial(
        tmp_path, s3_bucket, local_ray, monkeypatch, capsys):
    root = make_demo_data(tmp_path / "data", n_per_class=24, size=64)
    (tmp_path / "space.yaml").write_text(FAILING_SPACE)
    monkeypatch.chdir(tmp_path)
    run = f"{s3_bucket}/runs/s3run"
    fetched = []
    local_path = runfolder.local_path

    def recording_local_path(location):
        fetched.append(str(location))
        return local_path(location)

    monkeypatch.setattr(runfolder, "local_path", recording_local_path)
    assert main(["tune", str(root), "--storage-path", f"{s3_bucket}/runs", "--name", "s3run",
                 "--search-space", str(tmp_path / "space.yaml"), *TUNE]) == 0
    keys = set(bucket_keys(s3_bucket, "runs/s3run/"))
    for name in ["search.json", "search_space.yaml", "split.json", "best.json", "trials.json",
                 "results/metrics.json", "results/report.md", "results/roc.png",
                 "results/test_predictions.json", "export/model.pt", "export/config.json",
                 "export/model_card.md"]:
        assert f"runs/s3run/{name}" in keys, name

    best = json.loads(_read(f"{run}/best.json"))
    assert best["checkpoint"].startswith(f"{run}/trial_")
    assert f"-{best['trial_id']}/checkpoint_" in best["checkpoint"]
    assert best["checkpoint"].removeprefix(f"{s3_bucket}/") in keys
    assert best["trials"] == 2 and best["errored_trials"] == 1
    # Evaluation fetched the weights alone, and no resume state (optimizer) is left in the bucket.
    checkpoints = [f for f in fetched if "/checkpoint_" in f]
    assert checkpoints and all(f.endswith("/best.pt") for f in checkpoints), fetched
    assert not [k for k in keys if k.endswith("/last.pt")]

    [failed] = [t for t in json.loads(_read(f"{run}/trials.json")) if t["status"] == "error"]
    assert failed["epochs"] == 0 and failed["params"]["weights"] == "/nonexistent/resnet18.pt"
    assert "/nonexistent/resnet18.pt" in failed["error"]
    assert failed["error_file"].startswith(f"{run}/trial_")
    assert failed["error_file"].endswith(f"-{failed['trial_id']}/error.txt")
    assert b"/nonexistent/resnet18.pt" in _read(failed["error_file"])
    report = _read(f"{run}/results/report.md").decode()
    assert "### Failed trials (1)" in report and failed["error"] in report
    folder = failed["error_file"].split("/")[-2]  # named within the run folder, not by its URI
    assert f"(full error: {md_text(folder + '/error.txt')} in the run folder)" in report
    assert failed["trial_id"] in report

    # Another working directory, no local copy: export and predict from the bucket.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["export", run, "--out", str(tmp_path / "shipped")]) == 0
    assert {p.name for p in (tmp_path / "shipped").iterdir()} >= {"model.pt", "config.json"}
    predictions = json.loads(_read(f"{run}/results/test_predictions.json"))
    capsys.readouterr()
    assert main(["predict", f"{run}/export", str(root / predictions[0]["path"])]) == 0
    out, err = capsys.readouterr()
    path, prob, _ = out.strip().split("\t")
    assert float(prob) == round(predictions[0]["prob"], 4)
    assert "notice: 1 of these files are in the test split this model was scored on" in err

    # A later evaluation's line is in the bucket before the test split is read (after the
    # search's evaluation and predict's look).
    from results.pipeline import report_run

    def on_record():
        lines = [json.loads(line) for line in
                 _read(f"{run}/results/evaluations.jsonl").decode().splitlines()]
        assert [e["kind"] for e in lines] == ["evaluate", "predict", "evaluate"]
        assert lines[0]["test"] and lines[2]["test"] is None

    stop_at_the_first_test_probability(monkeypatch, on_record)
    with pytest.raises(KeyboardInterrupt):
        report_run(run, resamples=200, gradcams=0)


def test_a_search_in_which_no_trial_reports_fails_in_one_line(tmp_path, local_ray, capsys):
    root = make_demo_data(tmp_path / "data", n_per_class=24, size=64)
    # A one-option choice: a space that fixes every key searches nothing and is refused.
    (tmp_path / "space.yaml").write_text("weights: {choice: [/nonexistent/resnet18.pt]}\n")
    code = main(["tune", str(root), "--storage-path", str(tmp_path / "runs"), "--name", "dead",
                 "--search-space", str(tmp_path / "space.yaml"), "--num-samples", "1", *TUNE[2:]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    [line] = [line for line in err if line.startswith("ctscan:")]
    trials = json.loads((tmp_path / "runs/dead/trials.json").read_text())
    first = min(trials, key=lambda t: t["number"])
    assert line == (f"ctscan: search failed: no trial finished an epoch; trial "
                    f"{first['trial_id']} failed with {first['error']} "
                    f"(see {first['error_file']})")
    assert "/nonexistent/resnet18.pt" in line and runfolder.exists(first["error_file"])
