"""The scheduler fidelity table: cfg-export's samplers against diffusers, each row a tiny
random model saved with save_pretrained beside the scheduler config its family ships,
exported by cfg-export and sampled by the runtime with that scheduler (or another made
from_config of it) against diffusers on the same model, latents, prompts, guidance and noise.

    python benchmarks/scheduler_fidelity.py      (from the repository root)

Prints two markdown tables, each row's max |ours - diffusers| / max |diffusers| of the
final latents: the denoiser-level rows (tests/cfg_export/test_scheduler_fidelity.py) and
the pipeline-level rows, a whole diffusers pipeline's __call__ against `cfg-export sample
--prompt` on the same tiny pipeline folder (tests/cfg_export/pipelines/test_scheduler_rows.py);
the tests hold every row under 1e-5. Then what leaving out a config field, the noise or
guidance_rescale would cost. Asserts nothing.
"""
from __future__ import annotations

import contextlib
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from tests.cfg_export import test_scheduler_fidelity as fidelity  # noqa: E402
from tests.cfg_export.pipelines import test_scheduler_rows as rows  # noqa: E402
from tests.cfg_export.pipelines.conftest import SAVERS  # noqa: E402

FAMILIES = {"sd1": "SD 1.x (ships PNDM)", "sd2": "SD 2.x (ships DDIM, v-prediction)", "dit": "DiT (ships DDIM)"}


def describe(row: fidelity.Row) -> str:
    """The scheduler of a row as a user would write it in diffusers."""
    if row.cls is None:
        return "the shipped config"
    fields = "".join(f", {k}={v!r}" for k, v in row.fields.items())
    return f"{row.cls}.from_config(shipped{fields})"


def main() -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        start = time.perf_counter()
        models = fidelity.build_models(Path(tmp), stack)
        print(f"built and exported {len(models)} tiny models in {time.perf_counter() - start:.1f} s; "
              f"{fidelity.STEPS} steps, N={fidelity.N}, guidance_scale {fidelity.S} (w = {fidelity.S - 1})\n")
        print(f"| model | scheduler | diffusers side | runtime | error | < {fidelity.TOLERANCE:g} |")
        print("|---|---|---|---|---|---|")
        for row in fidelity.ROWS:
            error = row.run(models)
            runtime = f"--sampler {row.sampler}" if row.sampler else "(manifest's scheduler)"
            runtime += " --karras" if row.fields.get("use_karras_sigmas") else ""
            runtime += f" --guidance-rescale {row.rescale}" if row.rescale else ""
            name = row.scheduler + (f", guidance_rescale {row.rescale}" if row.rescale else "")
            print(f"| {FAMILIES[row.family]} | {name} | {describe(row)} | `{runtime.strip()}` | {error:.2e} | "
                  f"{'yes' if error < fidelity.TOLERANCE else 'NO'} |")
        print("\nWhat ignoring a field costs (the runtime's behaviour before these samplers):\n")
        print("| case | error |")
        print("|---|---|")
        for row, label in fidelity.ABLATIONS:
            print(f"| {label} | {row.run(models):.2e} |")
        pipeline_rows(Path(tmp))


def build_pipelines(root: Path) -> tuple[dict, dict]:
    """Saves, exports and loads back the tiny pipelines the pipeline-level rows use;
    returns ({name: artifact}, {name: diffusers pipeline})."""
    from cfg_export.export.pipelines import export_pipeline
    from tests import tiny_pipelines

    artifacts, references = {}, {}
    for name in rows.FAMILIES:
        folder = SAVERS[name](root / name)
        start = time.perf_counter()
        export_pipeline(folder, root / f"{name}-artifact")
        print(f"{name}: exported in {time.perf_counter() - start:.1f} s")
        artifacts[name] = root / f"{name}-artifact"
        references[name] = tiny_pipelines.load_pipeline(folder)
    return artifacts, references


def pipeline_rows(root: Path) -> None:
    """Prints the pipeline-level rows and their ablations."""
    print("\nPipeline level: the pipeline's __call__ against `cfg-export sample --prompt`\n")
    artifacts, references = build_pipelines(root)
    print(f"\n{rows.STEPS} steps, prompts {rows.PROMPTS}, negative prompts {rows.NEGATIVES}, guidance_scale "
          f"{rows.S} (w = {rows.S - 1})\n")
    print(f"| pipeline | scheduler | diffusers side | `cfg-export sample --prompt ...` | error "
          f"| < {rows.TOLERANCE:g} |")
    print("|---|---|---|---|---|---|")
    for row in rows.ROWS:
        error = row.run(artifacts, references)
        name = row.scheduler + (f", guidance_rescale {row.rescale}" if row.rescale else "")
        print(f"| {rows.FAMILIES[row.pipeline]} | {name} | {row.diffusers_side()} | `{row.runtime_flags()}` | "
              f"{error:.2e} | {'yes' if error < rows.TOLERANCE else 'NO'} |")
    print("\n| case | error |")
    print("|---|---|")
    for row, label in rows.ABLATIONS:
        print(f"| {label} | {row.run(artifacts, references):.2e} |")


if __name__ == "__main__":
    main()
