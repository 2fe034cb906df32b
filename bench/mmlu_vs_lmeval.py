"""Our MMLU 0-shot letter accuracy against lm-evaluation-harness's `mmlu` task, same CSVs and model.

lm-evaluation-harness runs in its own venv (`.venv-lmeval`, see --setup) and
reads our bundled CSVs through generated task configs: its `mmlu` default
template (description "The following are multiple choice questions (with
answers) about SUBJECT.", the question and lettered options, "Answer:",
choices " A".." D", metric acc) with `dataset_path: csv` pointing at
compress/data/mmlu instead of the hub. Both sides score the first
--limit questions of every one of the 57 subjects (36 -> 2,052 questions) on
the fp32 reference model, and the comparison is made question by question.

    .venv/bin/python bench/mmlu_vs_lmeval.py [--limit 36] [--threads 2] [--setup]

Writes bench/results/mmlu_vs_lmeval.json: both accuracies, their difference
(issue target: within 0.5 points), and how many questions the two pick the
same answer on.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
LMEVAL_VENV = ROOT / ".venv-lmeval"
LMEVAL_REQ = ["torch==2.13.0", "transformers==4.57.6", "lm-eval[hf]==0.4.13"]

TEMPLATE = """\
task: {task}
dataset_path: csv
dataset_kwargs:
  data_files:
    test: {test}
    dev: {dev}
  column_names: [question, A, B, C, D, answer]
test_split: test
fewshot_split: dev
fewshot_config:
  sampler: first_n
output_type: multiple_choice
description: "The following are multiple choice questions (with answers) about {name}.\\n\\n"
doc_to_text: "{{{{question.strip()}}}}\\nA. {{{{A}}}}\\nB. {{{{B}}}}\\nC. {{{{C}}}}\\nD. {{{{D}}}}\\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: "{{{{['A', 'B', 'C', 'D'].index(answer)}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def setup_venv() -> None:
    if not (LMEVAL_VENV / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(LMEVAL_VENV)], check=True)
    subprocess.run([str(LMEVAL_VENV / "bin" / "python"), "-m", "pip", "install", "--quiet",
                    "--disable-pip-version-check", *LMEVAL_REQ], check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=36, help="first N test questions of each subject")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--setup", action="store_true", help="create/update .venv-lmeval first")
    ap.add_argument("--work", default="/tmp/compress-mmlu-vs-lmeval", help="lm-eval's task configs and outputs")
    ap.add_argument("--reuse-lmeval", action="store_true",
                    help="read lm-eval's samples from an earlier run in --work instead of running it again")
    ap.add_argument("--output", default=str(ROOT / "bench" / "results" / "mmlu_vs_lmeval.json"))
    args = ap.parse_args()
    if args.setup:
        setup_venv()
    if not (LMEVAL_VENV / "bin" / "python").exists():
        sys.exit(f"{LMEVAL_VENV} is missing: run with --setup")

    import torch

    from compress.artifact import package_versions, write_json_atomic
    from compress.data import mmlu_dir
    from compress.models import load_model
    from compress.reference import reference_model_dir
    from compress.runner import run_tasks
    from eval.backends import TorchBackend
    from eval.multiple_choice import mmlu_subjects

    subjects = mmlu_subjects()
    model_dir = reference_model_dir()
    work = Path(args.work)
    tasks_dir, out_dir = work / "tasks", work / "out"
    cmd = [str(LMEVAL_VENV / "bin" / "python"), "-m", "lm_eval", "--model", "hf",
           "--model_args", f"pretrained={model_dir},dtype=float32", "--device", "cpu",
           "--tasks", ",".join(f"localmmlu_{s}" for s in subjects), "--include_path", str(tasks_dir),
           "--num_fewshot", "0", "--batch_size", str(args.batch_size), "--limit", str(args.limit),
           "--log_samples", "--output_path", str(out_dir)]
    lmeval_s = None
    if not (args.reuse_lmeval and out_dir.is_dir()):
        shutil.rmtree(work, ignore_errors=True)
        tasks_dir.mkdir(parents=True)
        for s in subjects:
            (tasks_dir / f"localmmlu_{s}.yaml").write_text(TEMPLATE.format(
                task=f"localmmlu_{s}", name=s.replace("_", " "),
                test=mmlu_dir() / "test" / f"{s}_test.csv", dev=mmlu_dir() / "dev" / f"{s}_dev.csv"))
        env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
        t = time.perf_counter()
        subprocess.run(cmd, check=True, env=env)
        lmeval_s = time.perf_counter() - t
    if lmeval_s is None:  # reused: the time lm-eval recorded for its own run
        res_files = sorted(out_dir.rglob("results_*.json"))
        if res_files:
            lmeval_s = float(json.loads(res_files[-1].read_text()).get("total_evaluation_time_seconds", "nan"))
    theirs: dict[str, int] = {}  # "subject/row" -> chosen index
    their_lls: dict[str, list[float]] = {}
    correct_theirs = 0
    for s in subjects:
        files = sorted(out_dir.rglob(f"samples_localmmlu_{s}_2*.jsonl"))  # name_<timestamp>.jsonl
        if not files:
            sys.exit(f"no lm-eval samples for {s} under {out_dir}")
        for line in files[-1].read_text().splitlines():
            rec = json.loads(line)
            lls = [float(r[0]) for r in rec["filtered_resps"]]  # (log-likelihood, is-greedy) per choice
            choice = max(range(len(lls)), key=lls.__getitem__)
            theirs[f"{s}/{rec['doc_id']}"] = choice
            their_lls[f"{s}/{rec['doc_id']}"] = lls
            correct_theirs += choice == int(rec["target"])
    lmeval_version = subprocess.run([str(LMEVAL_VENV / "bin" / "python"), "-c",
                                     "from importlib.metadata import version; print(version('lm-eval'))"],
                                    capture_output=True, text=True, check=True).stdout.strip()

    torch.set_num_threads(args.threads)
    lm = load_model(None)
    t = time.perf_counter()
    ours = run_tasks(TorchBackend(lm.model, lm.tokenizer, batch_size=args.batch_size), ["mmlu"],
                     options={"scoring": "letter", "shots": 0, "limit": args.limit})["mmlu"]
    ours_s = time.perf_counter() - t
    if set(theirs) != {it["id"] for it in ours["items"]}:
        sys.exit(f"question sets differ: {len(theirs)} scored by lm-eval, {len(ours['items'])} by us")
    same = sum(theirs[it["id"]] == it["choice"] for it in ours["items"])
    ll_diff = max(abs(a - b) for it in ours["items"] for a, b in zip(it["logprobs"], their_lls[it["id"]], strict=True))
    n = len(ours["items"])
    acc_theirs = correct_theirs / n
    res = {"command": " ".join(["python", *sys.argv]), "questions": n, "subjects": len(subjects),
           "limit_per_subject": args.limit, "ours_accuracy": ours["accuracy"], "lm_eval_accuracy": acc_theirs,
           "difference_points": round(100 * (ours["accuracy"] - acc_theirs), 3), "target_points": 0.5,
           "same_choice": same, "same_choice_fraction": same / n, "max_abs_loglikelihood_difference": ll_diff,
           "prepend_bos": ours["protocol"]["prepend_bos"],
           "ours_seconds": round(ours_s, 1), "lm_eval_seconds": lmeval_s and round(lmeval_s, 1),
           "lm_eval_version": lmeval_version, "lm_eval_command": " ".join(cmd[1:]), "versions": package_versions()}
    print(f"{n} questions: ours {100 * ours['accuracy']:.2f} %, lm-eval {100 * acc_theirs:.2f} % "
          f"(difference {res['difference_points']:+.2f} points); same answer on {same}/{n}, log-likelihoods "
          f"within {ll_diff:.1e}; "
          f"ours {ours_s:.0f} s, lm-eval {lmeval_s or float('nan'):.0f} s")
    write_json_atomic(Path(args.output), res)


if __name__ == "__main__":
    from compress.plugins import load_plugins

    load_plugins()  # passes, exporters and tasks, as the CLI registers them at start-up
    main()
