"""Benchmark of structured output on the openai backend, against the in-process API emulator. Prints its figures.

Model calls and total tokens per run (means over N runs, each through the Engine, in one session) for:
  (a) a plain run without output_schema,
  (b) two_pass_sentinel, happy path (the JSON between the nonce markers is valid),
  (c) single_pass (text.format json_schema),
  (d) two_pass_sentinel whose block is invalid, fixed by the repair pass,
  (e) and (f): a plain run and a two_pass_sentinel run of code that prints its own ===BEGIN_JSON=== block
      (then the model is not asked for a block: the JSON comes from the code's output),
and the ratios (b)/(a) and (f)/(e) for calls and for tokens. Target: <= 1.05.

Model calls are counted twice, independently: POST /responses requests the emulator served, and the run's own
`model_calls`. Tokens are the run's `usage.total_tokens`, i.e. what the emulator reports: about 4 characters per
token of the request's input + instructions (+50) and of the response's output (+10). It models the text the
structured mode adds (the marker instructions with the schema, the JSON block in the answer) but not the fixed
overhead the real API adds to every code_interpreter call (tool definitions, system prompt, the model's reasoning),
so the token ratio printed here is an upper bound of the real one for the same prompts.

Run: python bench/bench_structured.py [--runs N]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "server")]

from tests.emulator import Emulator  # noqa: E402

from code_interpreter_mcp.backends.openai import OpenAIBackend  # noqa: E402
from code_interpreter_mcp.engine import Engine  # noqa: E402

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "rows": {"type": "integer"},
        "mean": {"type": "number"},
        "top": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["rows", "mean", "top"],
}
CODE = """\
import statistics
sales = {'north': 120, 'south': 95, 'east': 143, 'west': 88}
with open('/mnt/data/sales.csv', 'w') as f:
    f.write('region,amount\\n' + ''.join(f'{k},{v}\\n' for k, v in sales.items()))
print('regions:', len(sales))
{'rows': len(sales), 'mean': statistics.mean(sales.values()), 'top': sorted(sales, key=sales.get)[-2:]}
"""
# The same work, with the code printing its own plain marker block (the documented way on both backends).
CODE_PRINTS = (
    CODE.rsplit("\n", 2)[0]
    + """
import json
result = {'rows': len(sales), 'mean': statistics.mean(sales.values()), 'top': sorted(sales, key=sales.get)[-2:]}
print('===BEGIN_JSON===')
print(json.dumps(result))
print('===END_JSON===')
"""
)
CASES = {
    "a": ("plain run, no schema", None, None),
    "b": ("two_pass_sentinel, happy path", "two_pass_sentinel", None),
    "c": ("single_pass", "single_pass", None),
    "d": ("two_pass_sentinel + repair", "two_pass_sentinel", "repair"),
    "e": ("plain run, code prints block", None, "prints"),
    "f": ("two_pass, code prints block", "two_pass_sentinel", "prints"),
}


async def measure(case: str, runs: int, data_dir: Path) -> dict[str, float]:
    _label, strategy, variant = CASES[case]
    emu = Emulator()
    if variant == "repair":
        emu.behaviour.sentinel_json = '{"rows": "four", "mean": 111.5, "top": ["north", "east"]}'
        emu.behaviour.repair_text = '{"rows": 4, "mean": 111.5, "top": ["north", "east"]}'
    settings = emu.settings(data_dir / case)
    engine = Engine(settings, backend=OpenAIBackend(settings, http_client=emu.http_client()))
    served: list[int] = []
    reported: list[int] = []
    tokens: list[int] = []
    tokens_in: list[int] = []
    tokens_out: list[int] = []
    try:
        async with engine.running():
            await engine.ready()
            session = await engine.session_for(None)
            await engine.run_code(session, "1")  # the container exists before measuring
            for _ in range(runs):
                before = emu.calls["responses"]
                result = (
                    await engine.run_code(
                        session,
                        CODE_PRINTS if variant == "prints" else CODE,
                        output_schema=SCHEMA if strategy else None,
                        json_strategy=strategy,
                    )
                ).result
                if result.status != "ok" or len(result.files) != 1:
                    raise RuntimeError(f"case {case}: unexpected result {result.status}, {result.warnings}")
                if strategy and result.json_ is None:
                    raise RuntimeError(f"case {case}: no valid JSON: {result.json_error}")
                expected_path = {"two_pass_sentinel": "sentinel", "single_pass": "single_pass"}.get(strategy or "")
                if variant == "repair":
                    expected_path = "repair"
                if strategy and (result.structured is None or result.structured.path != expected_path):
                    raise RuntimeError(f"case {case}: JSON came from {result.structured}")
                served.append(emu.calls["responses"] - before)
                reported.append(result.model_calls)
                tokens.append(result.usage.total_tokens if result.usage else 0)
                tokens_in.append(result.usage.input_tokens if result.usage else 0)
                tokens_out.append(result.usage.output_tokens if result.usage else 0)
    finally:
        emu.close()
    return {
        "calls": statistics.mean(served),
        "calls_reported": statistics.mean(reported),
        "tokens": statistics.mean(tokens),
        "tokens_sd": statistics.pstdev(tokens),
        "tokens_in": statistics.mean(tokens_in),
        "tokens_out": statistics.mean(tokens_out),
    }


async def main(runs: int) -> int:
    with tempfile.TemporaryDirectory(prefix="bench-structured-") as tmp:
        figures = {case: await measure(case, runs, Path(tmp)) for case in CASES}
    print(f"structured output on the openai backend (in-process emulator), {runs} runs per case, means")
    print(f"{'case':<36} {'model calls':>11} {'(reported)':>10} {'total tokens':>13} {'sd':>6} {'in':>7} {'out':>7}")
    for case, (label, _s, _v) in CASES.items():
        f = figures[case]
        print(
            f"({case}) {label:<32} {f['calls']:>11.2f} {f['calls_reported']:>10.2f} "
            f"{f['tokens']:>13.1f} {f['tokens_sd']:>6.1f} {f['tokens_in']:>7.1f} {f['tokens_out']:>7.1f}"
        )
    for base, struct in (("a", "b"), ("e", "f")):
        for what in ("calls", "tokens"):
            ratio = figures[struct][what] / figures[base][what]
            verdict = "met" if ratio <= 1.05 else "MISSED"
            print(
                f"ratio ({struct})/({base}): {'model calls' if what == 'calls' else 'total tokens'} {ratio:.3f} "
                f"[target <= 1.05: {verdict}]"
            )
    a, b = figures["a"], figures["b"]
    extra = b["tokens"] - a["tokens"]
    extra_in, extra_out = b["tokens_in"] - a["tokens_in"], b["tokens_out"] - a["tokens_out"]
    print(
        f"extra tokens of (b) over (a): {extra:.1f} per run (input {extra_in:.1f}: the marker instructions with "
        f"the schema; output {extra_out:.1f}: the JSON block)"
    )
    print(f"the token target holds once a plain run costs >= {extra / 0.05:.0f} tokens (extra / 0.05)")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10, help="runs per case (default 10)")
    args = parser.parse_args()
    sys.exit(asyncio.run(main(args.runs)))
