"""The ``deme-ray`` command line: each command parses its options, then calls one library function."""

from __future__ import annotations

import functools
import json
import logging
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from deme_ray.errors import DemeError

app = typer.Typer(
    name="deme-ray",
    help="DeMe (Decouple-then-Merge) diffusion finetuning: one expert per timestep range, trained at once on Ray.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
console = Console()
err_console = Console(stderr=True)
state = {"debug": False}

ConfigArg = Annotated[
    Optional[Path],
    typer.Argument(help="Experiment YAML (see `deme-ray init`); omitted = the embedded default.", show_default=False),
]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", help="Override a config key, e.g. --set decouple.steps=20 (repeatable; YAML values)."),
]


def command(*args, **kwargs):
    """Register a command whose errors print as one line (exit 2 for bad input) unless --debug."""

    def register(fn):
        @functools.wraps(fn)
        def run(*a, **kw):
            try:
                return fn(*a, **kw)
            except DemeError as exc:
                if state["debug"]:
                    raise
                err_console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
                raise typer.Exit(2) from None
            except KeyboardInterrupt:
                err_console.print("interrupted")
                raise typer.Exit(130) from None
            except Exception as exc:
                if state["debug"]:
                    raise
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                err_console.print(
                    f"[red]error:[/red] {type(exc).__name__}: {first} (run with --debug for the traceback)",
                    highlight=False, soft_wrap=True,
                )
                raise typer.Exit(1) from None

        return app.command(*args, **kwargs)(run)

    return register


def _version(value: bool) -> None:
    if value:
        console.print(f"deme-ray {version('deme-ray')}")
        raise typer.Exit()


@app.callback()
def main(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
    show_version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    state["debug"] = debug
    logging.basicConfig(
        level=logging.INFO, format="%(message)s", handlers=[RichHandler(console=err_console, show_path=False)],
        force=True,
    )
    for noisy in ("diffusers", "accelerate", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


@command()
def init(
    path: Annotated[Path, typer.Argument(help="Where to write the starter config.")],
    force: Annotated[bool, typer.Option("--force", help="Replace an existing file.")] = False,
) -> None:
    """Write a commented starter config with every key at its default.

    Example: [bold]deme-ray init experiment.yaml[/bold]
    """
    from deme_ray.config import starter_yaml

    if path.exists() and not force:
        raise DemeError(f"{path} already exists: pass --force to replace it or choose another path")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(starter_yaml())
    tmp.replace(path)
    console.print(f"wrote {path}; edit it, then run [bold]deme-ray validate {path}[/bold]")


@command()
def validate(
    config: Annotated[Path, typer.Argument(help="Experiment YAML to check.")],
    overrides: SetOpt = None,
) -> None:
    """Check an experiment config offline: keys, types, ranges against the model's timesteps, data.

    Example: [bold]deme-ray validate experiment.yaml --set decouple.num_ranges=8[/bold]
    """
    from deme_ray.config import load_config
    from deme_ray.plan import plan_experiment

    plan = plan_experiment(load_config(config, overrides))
    console.print(f"[green]valid:[/green] {config}")
    _print_plan(plan)


def _print_plan(plan) -> None:
    table = Table("expert", "timesteps", title=f"{len(plan.ranges)} experts, T={plan.num_train_timesteps}")
    for lo, hi in plan.ranges:
        table.add_row(f"{lo}_{hi}", f"[{lo}, {hi})")
    console.print(table)
    console.print(
        f"model {plan.config.model.base}, {plan.num_train_images} train images at {plan.resolution}px, "
        f"{plan.config.decouple.steps} steps per expert"
    )


@command()
def pretrain(
    out: Annotated[Path, typer.Option("--out", help="Pipeline folder to write.")] = Path("deme_ray/assets/digits-ddpm"),
    seed: Annotated[int, typer.Option(help="Seed of the pretraining run.")] = 0,
    max_steps: Annotated[int, typer.Option(help="Length of the cosine learning-rate decay; training stops here at the latest.")] = 4000,
) -> None:
    """Pretrain the embedded default (bundled:digits) until its probe loss plateaus.

    A small DDPM on scikit-learn's digits; this is how the committed asset was made.

    Example: [bold]deme-ray pretrain --out deme_ray/assets/digits-ddpm[/bold]
    """
    from deme_ray.pretrain import PretrainSettings, pretrain_digits

    def show(record: dict) -> None:
        console.print(
            f"step {record['step']:>5}  train loss {record['train_loss']:.4f}  probe loss {record['probe_loss']:.4f}"
            f"  ({record['seconds']:.0f}s)"
        )

    pretrain_digits(out, PretrainSettings(seed=seed, max_steps=max_steps), on_eval=show)
    console.print(f"wrote {out}")


@command("pretrain-classifier")
def pretrain_classifier(
    out: Annotated[Path, typer.Option("--out", help="Folder to write.")] = Path("deme_ray/assets/digits-classifier"),
    seed: Annotated[int, typer.Option(help="Seed of the training run.")] = 0,
) -> None:
    """Train the digits classifier whose features the bundled FID uses (>= 97% held-out accuracy).

    This is how the committed asset was made.
    Example: [bold]deme-ray pretrain-classifier --out deme_ray/assets/digits-classifier[/bold]
    """
    from deme_ray.fid import train_digits_classifier

    folder = train_digits_classifier(out, seed=seed)
    accuracy = json.loads((folder / "config.json").read_text()).get("held_out_accuracy")
    console.print(f"wrote {folder} (held-out accuracy {accuracy})")


@command()
def train(
    config: ConfigArg = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Output folder (default: output_dir).")] = None,
    address: Annotated[
        Optional[str], typer.Option("--address", help="Ray cluster to join, e.g. ray://HOST:10001 or auto.")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in the output folder (`deme-ray train --resume OUT`).")
    ] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty output folder.")] = False,
    overrides: SetOpt = None,
) -> None:
    """Finetune one expert per timestep range, all at once, on Ray (local by default).

    Example: [bold]deme-ray train --set decouple.steps=20[/bold]
    """
    from deme_ray.config import load_config
    from deme_ray.ray_train import train_experts

    if resume and config is not None and config.is_dir():
        out, config = config, None
    if resume and out is None:
        raise DemeError("--resume needs the run's folder: deme-ray train --resume OUT")
    cfg = load_config(config, overrides)
    record = train_experts(cfg, out, address=address, resume=resume, overwrite=overwrite)
    folder = Path(out or cfg.output_dir)
    table = Table("expert", "steps", "loss", title=f"run {record['run_id']}")
    for name, entry in record["experts"].items():
        table.add_row(name, str(entry.get("steps_done", "-")), f"{entry.get('metrics', {}).get('loss', float('nan')):.4f}")
    console.print(table)
    console.print(f"experts in {folder / 'experts'}, run record {folder / 'run.json'}")


def _run_config(run: Path, config: Optional[Path], overrides: Optional[list[str]]):
    """The config of a finished run (or CONFIG when given), with --set overrides applied."""
    from deme_ray.config import apply_overrides, load_config, validate
    from deme_ray.run_record import read_run

    if config is not None:
        return load_config(config, overrides)
    return validate(apply_overrides(read_run(run)["config"], list(overrides or [])), f"{run}/run.json")


RunOpt = Annotated[Path, typer.Option("--run", help="Output folder of `deme-ray train`.")]


@command()
def tune(
    config: ConfigArg = None,
    run: RunOpt = ...,
    address: Annotated[Optional[str], typer.Option("--address", help="Ray cluster to join.")] = None,
    overrides: SetOpt = None,
) -> None:
    """Search the merge weights of a trained run with Ray Tune against FID on held-out images.

    Writes OUT/search/ (trials.csv, best.json, search.png) and the best merge to OUT/merged/.
    Example: [bold]deme-ray tune --run runs/deme --set search.trials=32[/bold]
    """
    from deme_ray.search import run_search

    best = run_search(run, _run_config(run, config, overrides), address=address)
    weights = ", ".join(f"{w:.3f}" for w in best["weights"])
    console.print(f"best weights [{weights}] FID {best['fid']:.3f} after {best['trials']} trials")
    console.print(f"merged model in {run / 'merged'}, search results in {run / 'search'}")


@command()
def merge(
    weights: Annotated[str, typer.Option("--weights", help="One coefficient per expert, low-t first: 0.1,0.1,0.2,0.5")],
    run: Annotated[Optional[Path], typer.Option("--run", help="Output folder of `deme-ray train`.")] = None,
    base: Annotated[Optional[Path], typer.Option("--base", help="Base model folder (with --experts).")] = None,
    experts: Annotated[Optional[list[Path]], typer.Option("--experts", help="Expert folders, low-t first.")] = None,
    more_experts: Annotated[Optional[list[Path]], typer.Argument(hidden=True)] = None,
    method: Annotated[str, typer.Option("--method", help="linear, ties, dare_linear or dare_ties.")] = "linear",
    density: Annotated[float, typer.Option(help="Fraction of task-vector entries ties/dare keep.")] = 0.5,
    seed: Annotated[int, typer.Option(help="Seed of the dare drop.")] = 0,
    out: Annotated[Optional[Path], typer.Option("--out", help="Merged folder (default: RUN/merged).")] = None,
) -> None:
    """Merge experts into one model by task arithmetic: theta + sum_i w_i (theta_i - theta).

    Example: [bold]deme-ray merge --run runs/deme --weights 0.1,0.1,0.2,0.5[/bold]
    or [bold]deme-ray merge --base B --experts E1 E2 --weights 0.5,0.5 --method ties --out M[/bold]
    """
    from deme_ray.merge import merge_folders, parse_weights
    from deme_ray.run_record import load_run

    experts = list(experts or []) + list(more_experts or [])
    if run is not None:
        if base is not None or experts:
            raise DemeError("give --run, or --base with --experts, not both")
        trained = load_run(run)
        base, experts, out = trained.base_dir, trained.expert_dirs, out or run / "merged"
    elif base is None or not experts or out is None:
        raise DemeError("give --run OUT, or --base DIR --experts D1 ... DN --out DIR")
    folder = merge_folders(base, experts, parse_weights(weights), out, method=method, density=density, seed=seed)
    console.print(f"wrote {folder}")


@command()
def sample(
    model: Annotated[str, typer.Argument(help="Model folder (UNet or pipeline), or bundled:digits.")],
    out: Annotated[Path, typer.Option("--out", help="PNG grid to write.")] = Path("samples.png"),
    num: Annotated[int, typer.Option("--num", help="Number of images.")] = 64,
    steps: Annotated[int, typer.Option(help="Denoising steps.")] = 50,
    sampler: Annotated[str, typer.Option(help="ddim or ddpm.")] = "ddim",
    eta: Annotated[float, typer.Option(help="DDIM eta (0 = deterministic).")] = 0.0,
    seed: Annotated[int, typer.Option(help="Noise seed: the same seed gives the same images.")] = 0,
    use_gpu: Annotated[bool, typer.Option("--use-gpu", help="Sample on the GPU.")] = False,
) -> None:
    """Sample images from a model and write them as a grid.

    Example: [bold]deme-ray sample runs/deme/merged --num 64 --out grid.png[/bold]
    """
    from deme_ray.model import load_unet, resolve_model_dirs, training_scheduler
    from deme_ray.sampling import sample_images, save_grid
    from deme_ray.training import pick_device

    if sampler not in ("ddim", "ddpm"):
        raise DemeError(f"--sampler {sampler!r}: use ddim or ddpm")
    unet_dir, scheduler_dir = resolve_model_dirs(model)
    unet = load_unet(unet_dir)
    scheduler_config = dict(training_scheduler(scheduler_dir).config)
    images = sample_images(unet, scheduler_config, num, steps=steps, eta=eta, sampler=sampler, seed=seed,
                           device=pick_device(use_gpu))
    save_grid(images, out)
    console.print(f"wrote {out} ({num} images)")


@command()
def evaluate(
    run: RunOpt,
    config: ConfigArg = None,
    overrides: SetOpt = None,
) -> None:
    """FID of base, ensemble and merged model(s) of a run, on the same noise seeds.

    Writes OUT/evaluation/results.md and results.json and a sample grid per model.
    Example: [bold]deme-ray evaluate --run runs/deme --set evaluate.num_samples=2000[/bold]
    """
    from deme_ray.evaluate import EVALUATION_DIR, evaluate_run, results_markdown

    result = evaluate_run(run, _run_config(run, config, overrides))
    console.print(results_markdown(result))
    console.print(f"written to {run / EVALUATION_DIR}")


@command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Output folder.")] = Path("runs/demo"),
    quick: Annotated[bool, typer.Option("--quick", help="Smaller settings: about 3 minutes on 2 cores.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty output folder.")] = False,
    overrides: SetOpt = None,
) -> None:
    """The whole pipeline on the embedded default: train 4 experts, search, merge, evaluate, report.

    Example: [bold]deme-ray demo --quick[/bold]
    """
    from deme_ray.demo import run_demo

    report = run_demo(out, quick=quick, overwrite=overwrite, overrides=overrides, say=console.print)
    console.print(f"[green]report:[/green] {report}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
