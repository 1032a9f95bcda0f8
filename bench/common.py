"""Helpers shared by the benchmarks: interleaved timing, environment description, `docs/benchmarks.md` sections.

Every benchmark times its variants in interleaved rounds (A B C A B C ...) and reports the median per
variant, so drift on a shared machine (another job starting, frequency changes) hits every variant alike.
Results go to one `## <title>` section per benchmark in `docs/benchmarks.md`; writing one section leaves
the others as they are.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from modelzoo.models.registry import ModelConfig, config_class

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS_MD = REPO / "docs" / "benchmarks.md"
INTRO = """# Benchmarks

Measured with the scripts in `bench/`; each section below is written by one script (`--write`) and
states the command, date, software and CPU it ran on. Variants are timed in interleaved rounds and
reported as medians, and ratios are only taken between variants measured in the same run. Numbers from
a shared or busy machine are provisional; re-run the command to reproduce them.
"""


@dataclass(frozen=True)
class Timing:
    """Wall-clock seconds per call of one variant, one sample per round."""

    samples: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)


def time_interleaved(
    fns: Mapping[str, Callable[[], object]], *, warmup: int, repeats: int, number: int = 1
) -> dict[str, Timing]:
    """Time each function in interleaved rounds and return seconds per call, one sample per round.

    Args:
        fns: the variants, by name; each call is one unit of work (e.g. one training step).
        warmup: untimed calls of each variant before timing (allocator, caches, lazy init).
        repeats: timed rounds; each round runs every variant `number` times, in turn.
        number: calls per variant per round; the sample is their mean.
    """
    if repeats < 1 or number < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1, number >= 1, warmup >= 0; got {repeats=}, {number=}, {warmup=}")
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(number):
                fn()
            samples[name].append((time.perf_counter() - start) / number)
    return {name: Timing(tuple(s)) for name, s in samples.items()}


def cpu_model() -> str:
    """The CPU's model name from `/proc/cpuinfo`, or what `platform` knows elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict[str, str]:
    """What a result depends on besides the code: date, versions, CPU, threads, and how busy the machine was."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "threads": f"{torch.get_num_threads()} (of {os.cpu_count()} logical CPUs)",
        "load average at start (1, 5, 15 min)": load_average(),
    }


def load_average() -> str:
    """The machine's 1, 5 and 15 minute load averages: above ~0.5 on an idle run, other jobs shared the CPU."""
    return ", ".join(f"{load:.2f}" for load in os.getloadavg())


def command_line() -> str:
    """The command that is running, with the script path relative to the repository when it is inside it."""
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(REPO) if script.is_relative_to(REPO) else script
    return shlex.join(["python", str(shown), *sys.argv[1:]])


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table; cells are rendered with `str`."""
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(str(cell) for cell in line) + " |" for line in lines)


def section_body(body: str, command: str | None = None, env: Mapping[str, str] | None = None) -> str:
    """A section's text: the command in a code block, the environment as a list, then `body`."""
    env = environment() if env is None else env
    lines = ["```", command or command_line(), "```", ""]
    lines += [f"- {key}: {value}" for key, value in env.items()]
    return "\n".join([*lines, "", body.strip()])


def replace_section(text: str, title: str, body: str) -> str:
    """Return `text` with the section `## title` replaced by `body`, or appended when it is absent.

    A section runs from its heading to the next `## ` heading outside a fenced code block, or to the end.
    """
    lines = text.splitlines()
    heading = f"## {title}"
    start, end, in_fence = None, len(lines), False
    for i, line in enumerate(lines):
        if line.startswith("```"):
            in_fence = not in_fence
        elif not in_fence and line.startswith("## "):
            if start is not None:
                end = i
                break
            if line.rstrip() == heading:
                start = i
    before, after = (lines, []) if start is None else (lines[:start], lines[end:])
    parts = ["\n".join(before).rstrip(), f"{heading}\n\n{body.strip()}", "\n".join(after).strip()]
    return "\n\n".join(part for part in parts if part) + "\n"


def write_section(title: str, body: str, path: Path = BENCHMARKS_MD) -> None:
    """Write `body` as the section `## title` of `path` (created with a short intro if absent)."""
    text = path.read_text() if path.exists() else INTRO
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(replace_section(text, title, body))


def add_common_arguments(
    parser: argparse.ArgumentParser, *, repeats: int | None = None, seeded: str | None = None
) -> None:
    """The options every benchmark shares: `--repeats` (when it times rounds), `--threads`, `--seed` (when
    `seeded` names what the seed draws) and `--write`."""
    if repeats is not None:
        parser.add_argument(
            "--repeats", type=int, default=repeats, help=f"interleaved timed rounds; median taken (default: {repeats})"
        )
    parser.add_argument(
        "--threads",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="torch.set_num_threads (default: all cores this process may use)",
    )
    if seeded is not None:
        parser.add_argument("--seed", type=int, default=0, help=f"seed for {seeded} (default: 0)")
    parser.add_argument("--write", action="store_true", help="also write the results to docs/benchmarks.md")


def split_choices(parser: argparse.ArgumentParser, option: str, value: str, known: Sequence[str]) -> list[str]:
    """A comma-separated option's values; an unknown one is a usage error naming the choices."""
    chosen = value.split(",")
    unknown = sorted(set(chosen) - set(known))
    if unknown:
        parser.error(f"{option}: unknown {unknown}; choose from {sorted(known)}")
    return chosen


def begin(threads: int) -> dict[str, str]:
    """Set torch's thread count, then print and return the environment the benchmark runs in."""
    torch.set_num_threads(threads)
    env = environment()
    print("\n".join(f"{key}: {value}" for key, value in env.items()), "\n", flush=True)
    return env


def publish(section: str, text: str, env: dict[str, str], write: bool) -> None:
    """Record the load average at the end and, with `write`, put `text` in its section of docs/benchmarks.md."""
    env["load average at end (1, 5, 15 min)"] = load_average()
    if write:
        write_section(section, section_body(text, env=env))
        print(f"wrote section {section!r} of docs/benchmarks.md")


@dataclass(frozen=True)
class Shape:
    """A model shape, the batch it is timed on, and its default number of timed steps per round."""

    model: ModelConfig
    batch: int
    seq: int
    steps: int
    note: str = ""
    variants: tuple[str, ...] | None = None  # the script's variants to time; None: all of them

    @property
    def tokens(self) -> int:
        """Tokens per step."""
        return self.batch * self.seq


def model_size(size: str, **overrides: object) -> ModelConfig:
    """A size from `conf/model/<size>.yaml` (the repository's one table of sizes), with `overrides`."""
    values = OmegaConf.load(REPO / "conf" / "model" / f"{size}.yaml")
    del values["defaults"]  # the option's schema, chosen here by its family
    schema = OmegaConf.structured(config_class(values.family))
    return OmegaConf.to_object(OmegaConf.merge(schema, values, overrides))
