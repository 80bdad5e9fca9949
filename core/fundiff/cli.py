"""The ``fundiff`` command line.

Every user error (bad recipe, unknown component, broken plugin, missing run, corrupt
checkpoint) prints one message naming the cause and the fix and exits with status 2,
without a traceback.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys
from typing import Any, Optional, Sequence

import yaml

from .components import KINDS
from .errors import FundiffError

EXAMPLES = """\
examples:
  fundiff plugins                       list plugins and their components
  fundiff show sampler/ddim             parameters of one component
  fundiff check recipes/two-moons.yaml  validate a recipe without running it
  fundiff train recipes/two-moons.yaml --run-dir runs/two-moons
  fundiff sample runs/two-moons --sampler ddpm --steps 200 -n 2000
  fundiff report runs/two-moons         loss curve, samples and schedule in one PNG
  fundiff plot schedules --chain vp --out schedules.png
  fundiff likelihood runs/two-moons -n 1000   log-likelihood and bits/dim of held-out data
  fundiff -p no:gmm-oracle plugins      disable a plugin for one command
  fundiff convert diffusers-config scheduler_config.json --to-recipe sd.yaml
  fundiff train-classifier runs/gmm-cond   noise-aware classifier for guidance 'classifier'
  fundiff train-controlnet runs/digits --steps 500   ControlNet on coarse digits for guidance 'controlnet'
  fundiff distill runs/two-moons --method progressive --rounds 2 --out runs/two-moons-fast
  eval "$(fundiff completion bash)"      shell completion (bash; zsh: fundiff completion zsh)
  fundiff new-plugin my-designs --kind schedule --kind sampler   scaffold a plugin distribution
"""


def _parse_set(values: Optional[Sequence[str]]) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for item in values or ():
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise FundiffError(f"--set {item!r}: write SECTION.KEY=VALUE, e.g. --set sampler.steps=20")
        try:
            overrides[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise FundiffError(f"--set {item!r}: the value is not valid YAML") from None
    return overrides


def _registry(args: argparse.Namespace):
    from .registry import Registry

    enabled = [p for p in args.plugin if not p.startswith("no:")]
    disabled = [p[3:] for p in args.plugin if p.startswith("no:")]
    return Registry.discover(
        enabled=enabled,
        disabled=disabled,
        autoload=False if args.no_autoload else None,
        strict=args.strict_plugins,
    )


# ------------------------------------------------------------------------------ commands


def cmd_plugins(args: argparse.Namespace) -> int:
    registry = _registry(args)
    if args.json:
        payload = {
            "plugins": [p.to_json() for p in registry.plugins],
            "conflicts": [
                {"kind": es[0].kind, "name": es[0].name, "distributions": [e.distribution or e.plugin for e in es]}
                for es in registry.conflicts()
            ],
        }
        print(json.dumps(payload, indent=2))
        return 0
    rows = sorted(registry.plugins, key=lambda p: (p.distribution or "", p.name))
    for plugin in rows:
        origin = f"{plugin.distribution} {plugin.version}" if plugin.distribution else "(in-process)"
        components = ", ".join(f"{k}/{n}" for k, n in plugin.components)
        line = f"{plugin.name:<22} {origin:<24} {plugin.status:<9}"
        print(f"{line}{components}" if plugin.status == "ok" else line.rstrip())
        if plugin.error:
            print(f"    {plugin.error}")
    for entries in registry.conflicts():
        names = ", ".join(f"{e.distribution or e.plugin}:{e.name}" for e in entries)
        print(f"conflict: {entries[0].kind} '{entries[0].name}' is registered by several plugins; use one of {names}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from .config import describe_fields

    registry = _registry(args)
    kind, _, name = args.component.partition("/")
    if kind not in KINDS:
        raise FundiffError(f"show {args.component!r}: write KIND/NAME or KIND with KIND one of {', '.join(KINDS)}")
    if not name:
        for entry in registry.entries(kind):
            print(f"{entry.name:<20} {entry.summary}  [{entry.distribution or entry.plugin}]")
        return 0
    entry = registry.resolve(kind, name)
    fields = describe_fields(entry.cls)
    if args.json:
        print(
            json.dumps(
                {
                    "kind": kind,
                    "name": entry.name,
                    "summary": entry.summary,
                    "plugin": entry.plugin,
                    "distribution": entry.distribution,
                    "version": entry.version,
                    "requires": sorted(entry.cls.requires),
                    "provides": sorted(entry.cls.provides),
                    "parameters": fields,
                },
                indent=2,
            )
        )
        return 0
    print(f"{kind}/{entry.name}: {entry.summary}")
    print(f"  from {entry.origin}")
    if entry.cls.requires:
        print(f"  requires: {', '.join(sorted(entry.cls.requires))}")
    if entry.cls.provides:
        print(f"  provides: {', '.join(sorted(entry.cls.provides))}")
    if not fields:
        print("  parameters: none")
    else:
        print("  parameters:")
        width = max(len(f["name"]) for f in fields)
        type_width = max(len(f["type"]) for f in fields)
        for field in fields:
            print(f"    {field['name']:<{width}}  {field['type']:<{type_width}}  default {field['default']:<10}  {field['doc']}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe, _registry(args), overrides=_parse_set(args.set))
    if args.resolved:
        print(recipe.to_yaml(), end="")
    else:
        summary = ", ".join(f"{kind}={recipe.names[kind]}" for kind in KINDS if kind in recipe.components)
        print(f"{args.recipe}: ok ({summary})")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .pipeline import train

    run_dir = args.run_dir or os.path.join("runs", os.path.splitext(os.path.basename(args.recipe))[0])
    overrides = _parse_set(args.set)
    if args.steps is not None:
        overrides["train.steps"] = args.steps
    pipeline = train(args.recipe, run_dir, resume=args.resume, quiet=args.quiet, registry=_registry(args), overrides=overrides)
    if not args.quiet:
        print(f"trained to step {pipeline.step}: {run_dir}", file=sys.stderr)
    print(run_dir)
    return 0


def _write_samples(path: str, samples, labels, fmt: str, metadata: dict[str, str]) -> None:
    from .checkpoint import atomic_write_bytes

    if fmt == "npz":
        import numpy as np

        buffer = io.BytesIO()
        arrays = {"samples": samples.numpy()}
        if labels is not None:
            arrays["labels"] = labels.numpy()
        np.savez(buffer, **arrays)
        atomic_write_bytes(path, buffer.getvalue())
    else:
        from safetensors.torch import save

        tensors = {"samples": samples.contiguous()}
        if labels is not None:
            tensors["labels"] = labels.contiguous()
        atomic_write_bytes(path, save(tensors, metadata=metadata))


def _sample_in_parts(pipeline, stem: str, *, quiet: bool, truncation: Optional[dict] = None):
    """Sample batch by batch, writing each batch to ``STEM.parts/`` as it completes.

    A killed run resumes where it stopped: finished parts are read back (sample i depends only
    on the seed and i, so nothing is drawn twice or skipped); parts written under other
    settings are discarded. The folder is removed once the whole file is written.
    """
    import shutil

    from safetensors import SafetensorError
    from safetensors.torch import load_file, save
    from tqdm import tqdm

    from . import distributed
    from .checkpoint import atomic_write_bytes, atomic_write_text
    from .pipeline import recipe_hash

    options = pipeline.recipe.sample
    parts = stem + ".parts"
    settings = json.dumps(
        {
            "model": recipe_hash(pipeline.recipe),
            "sampler": pipeline.recipe.to_dict()["sampler"],
            "spacing": pipeline.recipe.to_dict().get("spacing"),
            "guidance": pipeline.recipe.to_dict()["guidance"],
            "sample": {k: v for k, v in pipeline.recipe.to_dict()["sample"].items() if k not in ("num_samples", "format")},
            "step": pipeline.step,
            "truncation": (truncation or {}).get("key"),
        },
        sort_keys=True,
    )
    manifest = os.path.join(parts, "settings.json")
    world = distributed.world(pipeline.device)
    if world.is_main:
        if os.path.isdir(parts) and (not os.path.exists(manifest) or open(manifest, encoding="utf-8").read() != settings):
            shutil.rmtree(parts)  # parts of a different sampling run: not ours to reuse
        os.makedirs(parts, exist_ok=True)
        atomic_write_text(manifest, settings)
    distributed.barrier(world)
    batches = list(range(0, options.num_samples, options.batch_size))

    def part_path(begin: int) -> str:
        return os.path.join(parts, f"{begin:012d}-{min(options.batch_size, options.num_samples - begin)}.safetensors")

    def read_part(path: str):
        try:
            return load_file(path) if os.path.exists(path) else None
        except (SafetensorError, OSError):
            return None  # a part torn by a crash is drawn again

    # under torchrun, batch b belongs to rank b % world size: the same batches as one process
    with tqdm(total=options.num_samples, disable=quiet or not world.is_main, desc="sample", unit="sample", dynamic_ncols=True) as bar:
        for index, begin in enumerate(batches):
            count = min(options.batch_size, options.num_samples - begin)
            if index % world.size == world.rank and read_part(part_path(begin)) is None:
                extra = {k: v for k, v in (truncation or {}).items() if k != "key"}
                samples, labels = pipeline.sample(count, start=begin, batch_size=count, **extra)
                tensors = {"samples": samples.contiguous()}
                if labels is not None:
                    tensors["labels"] = labels.contiguous()
                atomic_write_bytes(part_path(begin), save(tensors))
            bar.update(count)
    distributed.barrier(world)
    if not world.is_main:
        return None, parts
    chunks, label_chunks = [], []
    for begin in batches:
        tensors = read_part(part_path(begin))
        if tensors is None:
            raise FundiffError(f"sample part {part_path(begin)} is missing or unreadable; run the command again to redraw it")
        chunks.append(tensors["samples"])
        if "labels" in tensors:
            label_chunks.append(tensors["labels"])
    import torch

    result = torch.cat(chunks), (torch.cat(label_chunks) if label_chunks else None)
    return result, parts


def cmd_sample(args: argparse.Namespace) -> int:
    from .pipeline import load_run
    from .plotting import save_picture

    overrides = _parse_set(args.set)
    for key, value in (
        ("sampler.name", args.sampler),
        ("sampler.steps", args.steps),
        ("sample.seed", args.seed),
        ("sample.num_samples", args.num_samples),
        ("sample.batch_size", args.batch_size),
        ("sample.label", args.label),
        ("sample.format", args.format),
        ("guidance.name", args.guidance),
        ("spacing.name", args.spacing),
        ("sample.stop_logsnr", args.stop_at),
        ("sample.backend", args.backend),
        ("sample.cuda_graphs", True if args.cuda_graphs else None),
    ):
        if value is not None:
            overrides[key] = value
    truncation = None
    if args.init is not None:  # image-to-image: start from the file's tensors partially noised
        import hashlib

        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(args.init)
        except (SafetensorError, OSError) as exc:
            raise FundiffError(f"--init {args.init}: not a readable safetensors file ({exc})") from None
        init = tensors.get("samples", tensors.get("x", next(iter(tensors.values()), None)))
        if init is None:
            raise FundiffError(f"--init {args.init}: the file holds no tensors")
        if args.num_samples is None and init.shape[0] > 1:
            overrides["sample.num_samples"] = int(init.shape[0])
        digest = hashlib.sha256(init.float().contiguous().numpy().tobytes()).hexdigest()
        truncation = {"init": init.float(), "strength": args.strength, "key": f"{digest}:{args.strength}"}
    elif args.strength != 1.0:
        raise FundiffError("--strength needs --init (the tensors to start from)")
    pipeline = load_run(args.run_dir, registry=_registry(args), overrides=overrides)
    options = pipeline.recipe.sample
    sampler_name = pipeline.recipe.names["sampler"]
    stem = args.out or os.path.join(
        args.run_dir, "samples", f"{sampler_name.replace(':', '-')}-{pipeline.sampler.steps}steps-seed{options.seed}"
    )
    note = pipeline.sampling_note()  # e.g. the steps a truncated chain saves
    if note and not args.quiet:
        print(note, file=sys.stderr)
    result, parts = _sample_in_parts(pipeline, stem, quiet=args.quiet, truncation=truncation)
    if result is None:  # a non-main rank of a distributed run: rank 0 writes the files
        return 0
    samples, labels = result
    extension = ".npz" if options.format == "npz" else ".safetensors"
    tensor_path = stem + extension
    metadata = {"run": os.path.abspath(args.run_dir), "sampler": sampler_name, "steps": str(pipeline.sampler.steps), "seed": str(options.seed)}
    _write_samples(tensor_path, samples, labels, options.format, metadata)
    import shutil

    shutil.rmtree(parts, ignore_errors=True)
    print(tensor_path)
    if not args.no_plot:
        reference = pipeline.data.x[:4000] if pipeline.spec.modality == "points" else None
        title = f"{os.path.basename(os.path.normpath(args.run_dir))}: {sampler_name}, {pipeline.sampler.steps} steps"
        if save_picture(stem + ".png", samples, pipeline.spec, reference=reference, title=title):
            print(stem + ".png")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from . import plotting

    registry = _registry(args)
    kind = "schedule" if args.what == "schedules" else "noise"
    names = args.names or registry.names(kind)
    components = [(name, registry.build(kind, name)) for name in names]
    chain = registry.build("chain", args.chain)
    if args.what == "schedules":
        plotting.plot_schedules(args.out, components, chain)
    else:
        if not args.schedule:
            raise FundiffError("plot noise needs --schedule NAME for the perturbed examples (see: fundiff show schedule)")
        schedule = registry.build("schedule", args.schedule)
        for problem in plotting.plot_noises(args.out, components, schedule, chain):
            print(f"fundiff: skipped {problem}", file=sys.stderr)
    print(args.out)
    return 0


def cmd_likelihood(args: argparse.Namespace) -> int:
    """Mean log-likelihood of held-out data under the run's probability-flow ODE, computed by
    a registered sampler that offers ``log_likelihood`` (``--solver``, or the only one)."""
    import math

    import attrs
    import torch

    from .pipeline import load_run, make_denoise

    registry = _registry(args)
    pipeline = load_run(args.run_dir, registry=registry)
    data_set = pipeline.data_set
    fields = {f.name for f in attrs.fields(type(data_set))}
    if "seed" in fields:  # generated data: the same distribution under another seed is held out
        changes = {"seed": data_set.seed + 1, **({"n": args.num_samples} if "n" in fields else {})}
        data, source = attrs.evolve(data_set, **changes).load(), f"held-out points (data seed {data_set.seed + 1})"
    else:
        data, source = pipeline.data, "training points (the data set has no seed to draw held-out ones)"
    x = data.x[: args.num_samples]
    labels = data.labels[: args.num_samples] if pipeline.uses_labels and data.labels is not None else None
    model = pipeline.sampling_model().eval().requires_grad_(False)
    dtype = next((p.dtype for p in model.parameters()), torch.float64)
    solvers = [e.name for e in registry.entries("sampler") if callable(getattr(e.cls, "log_likelihood", None))]
    if args.solver is None and len(solvers) != 1:
        raise FundiffError(
            "choose the likelihood solver with --solver: "
            + ("no installed sampler offers log_likelihood" if not solvers else f"samplers that offer it: {', '.join(solvers)}")
        )
    solver_name = args.solver or solvers[0]
    if solver_name not in solvers:
        raise FundiffError(f"sampler '{solver_name}' has no log_likelihood; samplers that offer it: {', '.join(solvers) or '(none)'}")
    ode = registry.build("sampler", solver_name, rtol=args.rtol, atol=args.rtol)
    values = []
    for begin in range(0, x.shape[0], pipeline.recipe.sample.batch_size):
        end = min(begin + pipeline.recipe.sample.batch_size, x.shape[0])
        cond = labels[begin:end].to(pipeline.device) if labels is not None else None
        denoise = make_denoise(model, pipeline.parameterization, pipeline.guidance, cond)
        values.append(
            ode.log_likelihood(
                denoise, x[begin:end].to(pipeline.device, dtype), pipeline.schedule, pipeline.chain,
                probes=args.probes, exact_trace=args.exact_trace, seed=args.seed, sample_ids=torch.arange(begin, end), dtype=dtype,
            ).cpu()
        )
    ll = torch.cat(values)
    n, dim = ll.numel(), math.prod(x.shape[1:])
    stderr = float(ll.std()) / math.sqrt(n) if n > 1 else float("nan")
    print(f"log-likelihood: {float(ll.mean()):.4f} nats per example (+- {stderr:.4f} standard error; {n} {source})")
    print(f"bits per dimension: {-float(ll.mean()) / (dim * math.log(2)):.4f}")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from .distill import distill

    distill(
        args.run_dir, args.out, method=args.method, rounds=args.rounds, steps_per_round=args.steps_per_round,
        sampler=args.sampler, lr=args.lr, pairs=args.pairs, eval_samples=args.eval_samples, quiet=args.quiet,
        registry=_registry(args),
    )
    print(args.out)
    return 0


def cmd_train_classifier(args: argparse.Namespace) -> int:
    """Train the noise-aware classifier of ``guidance: classifier`` on a run's data and
    forward process; stores RUN_DIR/classifier.safetensors."""
    try:
        from fundiff_plugins.guidances.classifier import train_classifier_for_run
    except ImportError as exc:
        raise FundiffError(f"train-classifier needs the built-in 'classifier' guidance plugin: {exc}") from None
    path = train_classifier_for_run(args.run_dir, steps=args.steps, quiet=args.quiet)
    print(path)
    return 0


def cmd_train_controlnet(args: argparse.Namespace) -> int:
    try:
        from fundiff_plugins.guidances.controlnet import train_controlnet_for_run
    except ImportError as exc:
        raise FundiffError(f"train-controlnet needs the built-in 'controlnet' guidance plugin: {exc}") from None
    print(train_controlnet_for_run(args.run_dir, steps=args.steps, factor=args.factor, quiet=args.quiet))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .pipeline import METRICS_FILE, load_run
    from .plotting import plot_report

    pipeline = load_run(args.run_dir, registry=_registry(args))
    metrics = []
    path = os.path.join(args.run_dir, METRICS_FILE)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                try:
                    metrics.append(json.loads(line))
                except json.JSONDecodeError:
                    break
    samples, _ = pipeline.sample(args.num_samples, seed=args.seed, batch_size=args.num_samples)
    out = args.out or os.path.join(args.run_dir, "report.png")
    names = pipeline.recipe.names
    title = (
        f"{os.path.basename(os.path.normpath(args.run_dir))}: step {pipeline.step}; {names['denoiser']}, "
        f"{names['parameterization']}, {names['weighting']}, {names['schedule']}/{names['chain']}; "
        f"{names['sampler']} {pipeline.sampler.steps} steps"
    )
    reference = pipeline.data.x[:4000] if pipeline.spec.modality == "points" else None
    plot_report(out, metrics, samples, pipeline.spec, pipeline.schedule, pipeline.chain, title, reference)
    print(out)
    return 0


def cmd_new_plugin(args: argparse.Namespace) -> int:
    from .scaffold import new_plugin

    print(new_plugin(args.name, args.kind or (), args.dir))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """diffusers scheduler config <-> recipe sections (the converter ships with the built-in plugins)."""
    try:
        from fundiff_plugins.interop import diffusers_config as interop
    except ImportError as exc:
        raise FundiffError(f"convert needs the built-in plugins' interop module: {exc}") from None
    from .checkpoint import atomic_write_text

    if args.what == "diffusers-config":
        if args.to_diffusers_config:
            raise FundiffError("convert diffusers-config FILE.json takes --to-recipe OUT.yaml, not --to-diffusers-config")
        sections = interop.recipe_from_diffusers_config(interop.read_config(args.file))
        for note in sections.get("notes", []):
            print(f"fundiff: note: {note}", file=sys.stderr)
        text = yaml.safe_dump({k: v for k, v in sections.items() if k != "notes"}, sort_keys=False)
        if args.to_recipe:
            atomic_write_text(args.to_recipe, text)
            print(args.to_recipe)
        else:
            print(text, end="")
        return 0
    if args.to_recipe:
        raise FundiffError("convert recipe RECIPE.yaml takes --to-diffusers-config OUT.json, not --to-recipe")
    try:
        with open(args.file, encoding="utf-8") as handle:
            recipe = yaml.safe_load(handle)
    except (OSError, yaml.YAMLError) as exc:
        raise FundiffError(f"{args.file}: not a readable YAML recipe ({exc})") from None
    text = json.dumps(interop.diffusers_config_from_recipe(recipe or {}), indent=2) + "\n"
    if args.to_diffusers_config:
        atomic_write_text(args.to_diffusers_config, text)
        print(args.to_diffusers_config)
    else:
        print(text, end="")
    return 0


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> tuple[list[str], list[str]]:
    """(option strings, choices of positional arguments) of one parser."""
    options, choices = [], []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            continue
        options.extend(action.option_strings)
        if not action.option_strings and action.choices:
            choices.extend(str(c) for c in action.choices)
    return options, choices


def completion_script(parser: argparse.ArgumentParser, shell: str) -> str:
    """A bash (or zsh, through bashcompinit) completion script generated from the parser."""
    top_options, _ = _options(parser)
    commands = _subcommands(parser)
    cases = []
    for name, sub in commands.items():
        options, choices = _options(sub)
        cases.append(f'    {name}) words_="{" ".join(choices + options)}" ;;')
    script = f"""# fundiff completion ({shell}); generated by `fundiff completion {shell}`
_fundiff_complete() {{
  local cur="${{COMP_WORDS[COMP_CWORD]}}" cmd="" i=1 words_=""
  while [ $i -lt $COMP_CWORD ]; do
    case "${{COMP_WORDS[$i]}}" in
      -p) i=$((i + 1)) ;;
      -*) ;;
      *) cmd="${{COMP_WORDS[$i]}}"; break ;;
    esac
    i=$((i + 1))
  done
  case "$cmd" in
    "") words_="{" ".join(list(commands) + top_options)}" ;;
{chr(10).join(cases)}
  esac
  COMPREPLY=($(compgen -W "$words_" -- "$cur"))
}}
complete -o default -F _fundiff_complete fundiff
"""
    if shell == "zsh":
        script = "autoload -U +X compinit && compinit\nautoload -U +X bashcompinit && bashcompinit\n" + script
    return script


def cmd_completion(args: argparse.Namespace) -> int:
    print(completion_script(build_parser(), args.shell), end="")
    return 0


def _finish_help(parser: argparse.ArgumentParser) -> None:
    """Every subcommand's --help gets a description (its one-line help when none is given) and
    the top-level examples that use it."""
    for name, sub in _subcommands(parser).items():
        if not sub.description:
            sub.description = next(a.help for a in _subcommands_actions(parser) if a.dest == name)
        examples = [line for line in EXAMPLES.splitlines() if line.strip().startswith(f"fundiff {name} ") or re.match(rf"\s*fundiff (-\S+ \S+ )*{re.escape(name)}\b", line)]
        if examples and not sub.epilog:
            sub.epilog = "examples:\n" + "\n".join(examples)
            sub.formatter_class = argparse.RawDescriptionHelpFormatter


def _subcommands_actions(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action._choices_actions
    return []


# ------------------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fundiff",
        description="A plugin-based engine for diffusion models.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument(
        "-p",
        dest="plugin",
        action="append",
        default=[],
        metavar="NAME",
        help="load plugin NAME even with autoload off; 'no:NAME' disables it (repeatable)",
    )
    parser.add_argument("--no-autoload", action="store_true", help="load only plugins named with -p (FUNDIFF_DISABLE_PLUGIN_AUTOLOAD=1)")
    parser.add_argument("--strict-plugins", action="store_true", help="treat a broken plugin as an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("plugins", help="list plugins, their distributions and components")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_plugins)

    p = sub.add_parser("show", help="show a component's parameters (KIND/NAME), or list a kind's components (KIND)")
    p.add_argument("component", metavar="KIND[/NAME]")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("check", help="validate a recipe without running it")
    p.add_argument("recipe")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a recipe value (repeatable)")
    p.add_argument("--resolved", action="store_true", help="print the resolved recipe with every default")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("train", help="train a recipe into a run directory")
    p.add_argument("recipe")
    p.add_argument("--run-dir", help="where to write the run (default runs/RECIPE_NAME)")
    p.add_argument("--resume", action="store_true", help="continue the run's last checkpoint (starts fresh if there is none)")
    p.add_argument("--steps", type=int, help="override train.steps")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a recipe value (repeatable)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="sample a trained run; writes tensors and a picture")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--sampler", help="sampler name (default: the recipe's)")
    p.add_argument("--steps", type=int, help="sampler steps")
    p.add_argument("--guidance", help="guidance name")
    p.add_argument("--spacing", help="step selection name (default: the recipe's, or t evenly spaced)")
    p.add_argument("--init", metavar="FILE", help="truncation: start from these tensors (safetensors, key 'samples') partially noised")
    p.add_argument("--strength", type=float, default=1.0, help="with --init: start at the level with t nearest this, in (0, 1] (default 1)")
    p.add_argument("--stop-at", type=float, metavar="LOGSNR", help="truncation: stop at this logSNR and return the x0 estimate (sample.stop_logsnr)")
    p.add_argument("--seed", type=int, help="seed of the per-sample noise")
    p.add_argument("-n", "--num-samples", type=int, help="how many samples")
    p.add_argument("--batch-size", type=int, help="samples per batch (does not change the samples)")
    p.add_argument("--label", type=int, help="class label for conditional denoisers")
    p.add_argument("--format", choices=["safetensors", "npz"], help="tensor file format")
    p.add_argument(
        "--backend", choices=["auto", "torch", "triton"], help="fused sampling steps: triton kernels or the torch reference (sample.backend)"
    )
    p.add_argument("--cuda-graphs", action="store_true", help="capture the sampling loop in a CUDA graph and replay it (sample.cuda_graphs)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override sampler.*, guidance.* or sample.* (repeatable)")
    p.add_argument("--out", help="output path without extension (default RUN_DIR/samples/SAMPLER-STEPS-SEED)")
    p.add_argument("--no-plot", action="store_true", help="do not write a picture")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_sample)
    p = sub.add_parser("report", help="one PNG of a run: loss curve, samples, schedule")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("-n", "--num-samples", type=int, default=1000, help="samples to draw for the picture")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="PNG path (default RUN_DIR/report.png)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("plot", help="pictures of components: schedules or noise types")
    p.add_argument("what", choices=["schedules", "noise"])
    p.add_argument("names", nargs="*", metavar="NAME", help="components to draw (default: all registered)")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--chain", required=True, help="chain that maps logSNR to (alpha, sigma), e.g. vp")
    p.add_argument("--schedule", help="schedule of the perturbed examples in 'plot noise' (required there)")
    p.set_defaults(func=cmd_plot)
    p = sub.add_parser("likelihood", help="mean log-likelihood and bits/dim of held-out data (probability-flow ODE)")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("-n", "--num-samples", type=int, default=1000, help="how many held-out points (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the Hutchinson probes (default 0)")
    p.add_argument("--probes", type=int, default=1, help="Hutchinson probes per point (default 1)")
    p.add_argument("--exact-trace", action="store_true", help="exact divergence (one backward pass per data dimension)")
    p.add_argument("--rtol", type=float, default=1e-5, help="ODE solver tolerance, relative and absolute (default 1e-5)")
    p.add_argument("--solver", help="sampler that computes it (one offering log_likelihood; default: the only one)")
    p.set_defaults(func=cmd_likelihood)
    p = sub.add_parser("distill", help="distill a run into a faster sampler (progressive halving or one step)")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--method", required=True, choices=["progressive", "one-step"], help="Salimans-Ho halving or Luhman-Luhman one step")
    p.add_argument("--out", required=True, metavar="NEW_RUN_DIR", help="where to write the distilled run")
    p.add_argument("--rounds", type=int, default=1, help="progressive: halvings of the run's sampler.steps (default 1)")
    p.add_argument("--steps-per-round", type=int, default=1000, help="optimizer steps per round (default 1000)")
    p.add_argument("--sampler", help="the distilled run's sampler (default: the run's; use a deterministic first-order one)")
    p.add_argument("--lr", type=float, help="learning rate (default: the run's train.lr)")
    p.add_argument("--pairs", type=int, default=4096, help="one-step: teacher samples to regress (default 4096)")
    p.add_argument("--eval-samples", type=int, default=1000, help="samples for each round's sliced Wasserstein (default 1000)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=cmd_distill)
    p = sub.add_parser("train-classifier", help="train the noise-aware classifier of guidance 'classifier' into RUN_DIR")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--steps", type=int, default=2000, help="optimizer steps (default 2000)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=cmd_train_classifier)
    p = sub.add_parser(
        "train-controlnet",
        help="train a ControlNet (coarse-image condition) for guidance 'controlnet' into RUN_DIR",
        description="Freeze the run's U-Net, train a copy of its encoder on (data, coarse data) with the run's loss; writes RUN_DIR/controlnet.safetensors.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps (default 1000)")
    p.add_argument("--factor", type=int, default=2, help="average-pooling factor of the coarse condition (default 2)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=cmd_train_controlnet)
    p = sub.add_parser(
        "new-plugin",
        help="scaffold a plugin distribution fundiff-NAME with a working example per kind",
        description="Write DIR/fundiff-NAME: pyproject with entry points, one module per kind, tests, README.",
    )
    p.add_argument("name", metavar="NAME", help="plugin name: lower case, words joined by hyphens")
    p.add_argument("--kind", action="append", metavar="KIND", help=f"component kind to include (repeatable; default all: {', '.join(KINDS)})")
    p.add_argument("--dir", default=".", help="where to create the project (default: the current directory)")
    p.set_defaults(func=cmd_new_plugin)
    p = sub.add_parser(
        "convert",
        help="convert a diffusers scheduler config to recipe sections, or a recipe to a diffusers config",
        description="diffusers-config FILE.json [--to-recipe OUT.yaml] | recipe RECIPE.yaml [--to-diffusers-config OUT.json]",
    )
    p.add_argument("what", choices=["diffusers-config", "recipe"], help="what FILE is")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--to-recipe", metavar="OUT.yaml", help="write the schedule/parameterization/sampler/spacing sections here")
    p.add_argument("--to-diffusers-config", metavar="OUT.json", help="write the diffusers scheduler config here")
    p.set_defaults(func=cmd_convert)
    p = sub.add_parser("completion", help="print a shell completion script: eval \"$(fundiff completion bash)\"")
    p.add_argument("shell", choices=["bash", "zsh"])
    p.set_defaults(func=cmd_completion)
    _finish_help(parser)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from . import __version__

        print(f"fundiff {__version__}")
        return 0
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except FundiffError as exc:
        print(f"fundiff: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fundiff: interrupted", file=sys.stderr)
        return 130
    finally:
        if "torch.distributed" in sys.modules:  # only a command that used torch can hold a process group
            from . import distributed

            distributed.shutdown()
