"""Check a ``lit-sae fit | validate | test`` command line in a fraction of a second, before torch or Lightning load.

A mistyped key or a wrong value should fail at once, not after the ~5 s that importing Lightning takes. This module
builds the same jsonargparse parser that LightningCLI builds (model, data, trainer, the subcommand's own options,
the same links and parser mode), but from *signatures read from the source files* instead of imported classes:
``SAEModule`` / ``SAESweepModule``, lit-sae's DataModules and Lightning's ``Trainer`` are parsed with ``ast`` and
rebuilt as light stand-in classes with the same parameter names, annotations and defaults. jsonargparse then parses
the command line exactly as it would for the real classes.

The check is one-sided: it may let a bad command through (LightningCLI, which runs next, still rejects it), but it
never rejects a command the real parser accepts. It stands aside (returns without a verdict) when

- the command needs the real classes: a DataModule ``class_path`` outside lit-sae (importing anything that is not
  the standard library, jsonargparse's own packages or a stand-in is refused during the check, and an error that
  names a refused module is left to LightningCLI);
- an annotation or default cannot be read without importing (that parameter then accepts any value);
- the command asks for help or a printed config (LightningCLI answers those).

``tests/cli/test_cli_check.py`` keeps the stand-in parser's keys and types equal to the real one's.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import importlib.abc
import importlib.machinery
import importlib.util
import inspect
import pathlib
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import lit_sae

# Options that data passes to the model when both are instantiated (lit_sae.cli.trainer.SAECLI uses these too).
LINKS = (("data.d_in", "model.d_in"), ("data.hook_point", "model.hook_point"), ("data.model_name", "model.lm_name"))
#: model keys read from a data attribute that only some DataModules have (a transcoder's target hook point).
OPTIONAL_LINKS = (("model.d_out", "d_target"), ("model.target_hook_point", "target_hook_point"))
UNTRAINED_HELP = ("validate / test only: evaluate the model's initial weights on purpose (without it, these commands "
                  "need --ckpt_path or --model.init_from, so that untrained weights are never reported by mistake)")
SEED_HELP = ("Set to an int to run seed_everything with this value before classes instantiation. Set to True to use "
             "a random seed.")

# The arguments LightningCLI leaves out of each subcommand's Trainer method (LightningCLI.subcommands()).
METHOD_SKIP = {
    "fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"},
    "validate": {"model", "dataloaders", "datamodule"},
    "test": {"model", "dataloaders", "datamodule"},
}
MODEL_CLASSES = {"module": ("train/module.py", "SAEModule"), "sweep": ("train/sweep.py", "SAESweepModule")}
DATA_CLASSES = {"lit_sae.data.datamodule": ("data/datamodule.py", "ActivationDataModule"),
                "lit_sae.data.synthetic": ("data/synthetic.py", "SyntheticDataModule"),
                "lit_sae.data.lm_stream": ("data/lm_stream/datamodule.py", "LMStreamDataModule"),
                "lit_sae.train.context_data": ("train/context_data.py", "ContextDataModule")}
# Top-level packages an import may load during the check: besides the standard library, jsonargparse and its
# optional packages (jsonargparse/_optionals.py). Any other import is refused and the check stands aside.
ALLOWED_IMPORTS = {"jsonargparse", "yaml", "omegaconf", "antlr4", "docstring_parser", "typeshed_client",
                   "typing_extensions", "argcomplete", "_jsonnet", "jsonschema", "requests", "fsspec", "ruamel",
                   "attrs", "attr", "pydantic", "pydantic_core", "toml", "lit_sae"}
_ASKS_FOR_OUTPUT = re.compile(r"^(-h|--help|--print_config|--[\w.]*\.help)(=|$)")


class CannotCheck(Exception):
    """The command needs the real classes: the check stands aside and LightningCLI decides."""


class ModuleBase:
    """Stand-in for ``lightning.LightningModule``."""


class DataModuleBase:
    """Stand-in for ``lightning.LightningDataModule`` (the base of ``--data``'s subclasses)."""


class TrainerBase:
    """Stand-in for ``lightning.Trainer``."""


# ------------------------------------------------------------------------------------------------ reading signatures
_NAMESPACE: dict[str, Any] = {**{n: getattr(typing, n) for n in typing.__all__}, "Path": Path, "pathlib": pathlib,
                              "typing": typing}


class _AnyForUnknown(dict):
    """Names an annotation uses that typing and builtins do not define stand for ``Any`` (``list[Callback]`` reads
    as ``list[Any]``: still a list, so ``callbacks+:`` keeps working)."""

    def __missing__(self, key: str) -> Any:
        return getattr(builtins, key, Any)


def _annotation(node: Optional[ast.expr]) -> Any:
    """An annotation as a type, evaluated from typing and builtins only; ``Any`` for what it names otherwise."""
    if node is None:
        return inspect.Parameter.empty
    try:  # source of lit-sae or Lightning, not user input
        return eval(ast.unparse(node), {}, _AnyForUnknown(_NAMESPACE))  # noqa: S307
    except Exception:
        return Any


def _default(node: Optional[ast.expr]) -> Any:
    """A default that is a literal (or arithmetic of literals); None where it names a constant of the module."""
    if node is None:
        return inspect.Parameter.empty
    try:
        return eval(compile(ast.Expression(node), "<default>", "eval"), {"__builtins__": {}})  # noqa: S307
    except Exception:
        return None


def _parameters(fn: ast.FunctionDef, skip: frozenset = frozenset()) -> list[inspect.Parameter]:
    """``fn``'s parameters after ``self`` as ``inspect.Parameter``; CannotCheck for ``*args`` / ``**kwargs`` (where
    jsonargparse would follow them into the parent class)."""
    if fn.args.vararg or fn.args.kwarg or fn.args.posonlyargs:
        raise CannotCheck(f"{fn.name} takes *args / **kwargs")
    args = fn.args
    positional = list(zip(args.args, [None] * (len(args.args) - len(args.defaults)) + list(args.defaults)))[1:]
    kw = list(zip(args.kwonlyargs, args.kw_defaults))
    params = []
    for kind, pairs in ((inspect.Parameter.POSITIONAL_OR_KEYWORD, positional), (inspect.Parameter.KEYWORD_ONLY, kw)):
        for arg, default_node in pairs:
            if arg.arg in skip:
                continue
            annotation, default = _annotation(arg.annotation), _default(default_node)
            if default is None and default_node is not None and annotation not in (Any, inspect.Parameter.empty):
                annotation = Optional[annotation]  # an unreadable default stands as None: let None pass
            params.append(inspect.Parameter(arg.arg, kind, default=default, annotation=annotation))
    return params


def _class_node(source: Path, class_name: str) -> ast.ClassDef:
    try:
        tree = ast.parse(source.read_text(encoding="utf-8"))
    except (OSError, SyntaxError) as exn:
        raise CannotCheck(f"{source}: {exn}") from None
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            return node
    raise CannotCheck(f"{source} defines no class {class_name}")


def _method(cls: ast.ClassDef, name: str) -> ast.FunctionDef:
    for node in cls.body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return node
    raise CannotCheck(f"class {cls.name} has no {name}")


def _function(name: str, params: list[inspect.Parameter], doc: Optional[str]) -> Callable:
    def fn(self, *args: Any, **kwargs: Any) -> None:
        """Stand-in: never called (the check only parses)."""

    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = doc
    fn.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD), *params])
    return fn


def standin_class(source: Path, class_name: str, base: type, module: str, methods: tuple[str, ...] = (),
                  skip: Optional[dict[str, set]] = None) -> type:
    """A class named like ``source``'s ``class_name`` whose ``__init__`` (and ``methods``) have the real signatures,
    read with ``ast`` (nothing of ``source`` is imported). Raises CannotCheck where that is not possible."""
    node = _class_node(source, class_name)
    attrs: dict[str, Any] = {"__module__": module, "__doc__": ast.get_docstring(node)}
    for name in ("__init__", *methods):
        fn = _method(node, name)
        params = _parameters(fn, frozenset((skip or {}).get(name, ())))
        attrs[name] = _function(name, params, ast.get_docstring(fn))
    cls = type(class_name, (base,), attrs)
    if module == __name__:  # not named like the real class: jsonargparse must not look the name up in lit_sae
        cls.__qualname__ = f"StandIn{class_name}"
    return cls


def _lightning_trainer_source() -> Path:
    spec = importlib.machinery.PathFinder.find_spec("lightning")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise CannotCheck("lightning is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "pytorch" / "trainer" / "trainer.py"


# ------------------------------------------------------------------------------------------------ the check itself
class _StandIns(importlib.abc.MetaPathFinder):
    """While active: lit-sae's DataModule modules are stand-ins, and any other import outside ``ALLOWED_IMPORTS``
    and the standard library fails (it would need the real classes, e.g. a user's own DataModule)."""

    def __init__(self) -> None:
        self.refused: list[str] = []

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        top = fullname.split(".")[0]
        if top in sys.stdlib_module_names or (top in ALLOWED_IMPORTS and not fullname.startswith("lit_sae.")):
            return None
        if fullname == "lit_sae.data" or importlib.machinery.PathFinder.find_spec(fullname, path) is None:
            return None  # not installed: the import fails as usual (libraries probe for optional packages)
        self.refused.append(fullname)
        return importlib.util.spec_from_loader(fullname, _Refuse())


class _Refuse(importlib.abc.Loader):
    def create_module(self, spec: Any) -> None:
        raise ModuleNotFoundError(f"{spec.name} is not imported while checking the command line", name=spec.name)

    def exec_module(self, module: Any) -> None:  # never reached: create_module raises
        raise ModuleNotFoundError(module.__name__)


@contextlib.contextmanager
def _standins() -> Iterator[_StandIns]:
    root = Path(lit_sae.__file__).parent
    modules = {}
    for name, (file, cls_name) in DATA_CLASSES.items():
        module = types.ModuleType(name)
        setattr(module, cls_name, standin_class(root / file, cls_name, DataModuleBase, name))
        modules[name] = module
    saved = {name: sys.modules.get(name) for name in modules}
    finder = _StandIns()
    sys.modules.update(modules)
    sys.meta_path.insert(0, finder)
    try:
        yield finder
    finally:
        sys.meta_path.remove(finder)
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def build_parser(command: str, model: str = "module") -> Any:
    """The jsonargparse parser LightningCLI builds for ``lit-sae [sweep] <command>``, from stand-in classes.

    Raises CannotCheck when a signature cannot be read from its source."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    root = Path(lit_sae.__file__).parent
    file, name = MODEL_CLASSES[model]
    model_cls = standin_class(root / file, name, ModuleBase, __name__)
    trainer_cls = standin_class(_lightning_trainer_source(), "Trainer", TrainerBase,
                                __name__, methods=(command,),
                                skip={command: METHOD_SKIP[command]})
    parser = ArgumentParser(prog="lit-sae", parser_mode="omegaconf+", exit_on_error=False, env_prefix="PL",
                            default_env=False, allow_abbrev=False)
    parser.add_argument("-c", "--config", action=ActionConfigFile, help="Path to a configuration file.")
    parser.add_argument("--seed_everything", type=Union[bool, int], default=True, help=SEED_HELP)
    parser.add_class_arguments(model_cls, "model", fail_untyped=False, sub_configs=True)
    parser.add_subclass_arguments(DataModuleBase, "data", fail_untyped=False, required=False)
    parser.add_class_arguments(trainer_cls, "trainer", fail_untyped=False, instantiate=False, sub_configs=True)
    add_lit_sae_arguments(parser)
    parser.add_method_arguments(trainer_cls, command, skip=METHOD_SKIP[command])
    return parser


def add_lit_sae_arguments(parser: Any) -> None:
    """What lit-sae adds to LightningCLI's parser (shared with ``SAECLI.add_arguments_to_parser``)."""
    for source, target in LINKS:
        parser.link_arguments(source, target, apply_on="instantiate")
    for target, attribute in OPTIONAL_LINKS:  # DataModules without a target hook point give None
        try:
            parser.link_arguments("data", target, compute_fn=_attribute_or_none(attribute), apply_on="instantiate")
        except ValueError:  # "No action for key": the model has no such argument (SAESweepModule: no transcoders)
            pass
    parser.add_argument("--untrained", type=bool, default=False, help=UNTRAINED_HELP)


def check(argv: list[str], model: str = "module") -> None:
    """Parse ``argv`` (``[command, *options]``) against the stand-in parser.

    Raises ``ConfigError`` (one line, as LightningCLI's own check would word it) when the parser rejects
    the command; returns None when it accepts it or cannot judge it."""
    from lit_sae.cli.messages import config_error

    if not argv or argv[0] not in METHOD_SKIP or any(_ASKS_FOR_OUTPUT.match(a) for a in argv[1:]):
        return
    try:
        with _standins() as finder:
            try:
                parser = build_parser(argv[0], model)
            except Exception:  # sources it cannot read as expected (another Lightning, say): LightningCLI decides
                return
            try:
                parser.parse_args(argv[1:])
            except Exception as exn:  # jsonargparse's ArgumentError, or a TypeError of a bad value
                if any(name in str(exn) for name in finder.refused):
                    return  # the error comes from an import refused here (e.g. a DataModule outside lit-sae)
                raise config_error(exn, argv[0], parser) from None
    except CannotCheck:
        return


def suggesting_parser() -> type:
    """jsonargparse's ArgumentParser whose errors for an unknown option add the nearest valid one (``--ou``: did you
    mean 'out'?), as ``lit-sae fit`` does (``lit_sae.cli.messages.suggest_key``)."""
    from jsonargparse import ArgumentParser

    class SuggestingParser(ArgumentParser):
        def error(self, message: str, ex: Optional[Exception] = None):
            from lit_sae.cli.messages import suggest_key

            return super().error(f"{message}{suggest_key(message, self)}", ex)

    return SuggestingParser


def _attribute_or_none(name: str):
    def compute(data: Any) -> Any:
        return getattr(data, name, None)

    return compute
