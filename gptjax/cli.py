"""How every `python -m gptjax.<command>` starts, so that they all treat a mistake the same way.

- `run(main)`: absl's `app.run`, except that a bad flag (`--step=abc`, an unknown flag, `--config.train.steps=abc`)
  is one `error: ...` line and exit status 2 like every other user mistake (absl prints a FATAL block and exits 1),
  `--help` shows the command's own flags, `--config` included, and exits 0, a stray positional argument
  (`train experiments/tiny.py`, a forgotten `--config`) is an error instead of being silently ignored, and the
  Apple stack's shims (gptjax/compat.py) are installed before `main` runs.
- `define_config_flag`: ml_collections' `--config` flag, with a missing file or an unknown key as one line.
- `parse_own_flags`: the same parsing for the commands that are also called as functions (scaling, benchmarks).
"""

import re
import sys

import ml_collections
from absl import app, flags, logging

from gptjax import compat
from gptjax.configs import load_config_file
from gptjax.errors import UserError, exit_on_user_error

HELP_FLAGS = ("-h", "-?", "--help", "--helpshort", "--helpfull")
LIST_KEYS_HINT = ("Every config key, with its value in an experiment and what it means:\n"
                  "  python -m gptjax.configs --config experiments/tiny.py\n"
                  "Override any of them as --config.<group>.<key>=<value>, e.g. --config.train.batch_size=64.")


def command_help(flag_values: flags.FlagValues | None = None, description: str | None = None) -> str:
    """The running command's docstring and its own flags (absl's --help hides flags defined in other modules, such
    as --config, and exits 1). With `flag_values`, a command's own FlagValues: all of its flags."""
    main = sys.modules["__main__"]
    lines = [(description or main.__doc__ or "").strip(), "", "flags:"]
    by_module = (flags.FLAGS.flags_by_module_dict().items() if flag_values is None
                 else [("", [flag_values[name] for name in flag_values])])
    for module, module_flags in sorted(by_module):
        if flag_values is None and module != sys.argv[0] and not module.startswith("gptjax"):  # libraries' flags
            continue
        for flag in sorted(module_flags, key=lambda f: f.name):
            default = "" if flag.default is None else f" (default: {flag.default_as_str})"
            lines.append(f"  --{flag.name}: {flag.help}{default}")
    if flag_values is None and "config" in flags.FLAGS:
        lines += ["", LIST_KEYS_HINT]
    return "\n".join(lines)


def parse_flags(argv: list[str], flag_values: flags.FlagValues | None = None,
                description: str | None = None) -> list[str]:
    """absl's flag parsing (of the global flags, or of `flag_values`) with --help answered here and every flag error
    as one line (exit 2)."""
    if any(arg in HELP_FLAGS for arg in argv[1:]):
        print(command_help(flag_values, description))
        sys.exit(0)
    with exit_on_user_error():
        try:
            remaining = (flags.FLAGS if flag_values is None else flag_values)(argv)
        except flags.Error as e:
            message = " ".join(str(e).split())
            if "Non-boolean argument to boolean flag" in message:  # absl shows the raw (reason, value) tuple
                flag = message.split(":", 1)[0].removeprefix("flag ")
                raise UserError(f"{flag} is not a boolean: use true or false (also 1/0)") from None
            raise UserError(f"{message}{flag_error_hint(message, flag_values or flags.FLAGS)}; see --help") from None
        if len(remaining) > 1:
            looks_like_config = remaining[1].endswith(".py") and "config" in (flag_values or flags.FLAGS)
            hint = f"; did you mean --config {remaining[1]}?" if looks_like_config else ""
            raise UserError(f"unexpected argument {remaining[1]!r}: options are passed as --name=value{hint}")
    return remaining


def flag_error_hint(message: str, flag_values: flags.FlagValues) -> str:
    """The fix for the two flag errors a user makes most: a whole number written as a float (`steps=1e3`) and a
    config key without its `config.` prefix (`--train.steps=10`)."""
    not_an_integer = re.search(r"flag --(\S+)=(\S+): invalid literal for int\(\)", message)
    if not_an_integer:
        name, value = not_an_integer.groups()
        try:
            number = float(value)
        except ValueError:
            return ""
        if number.is_integer():
            return f" (an integer: write --{name}={int(number)})"
    unknown = re.search(r"Unknown command line flag '([\w.]+)'", message)
    if unknown and "." in unknown.group(1) and "config" in flag_values:
        return f" (did you mean --config.{unknown.group(1)}?)"
    return ""


def run(main) -> None:
    """Runs `main()` as the command: flags parsed by `parse_flags`, absl's INFO chatter (Orbax logs every file it
    writes) turned off, and UserErrors raised by `main` reported as one line."""

    def main_with_one_line_errors(argv):
        del argv  # parse_flags has refused anything but flags
        compat.install()  # what the Apple stack's older JAX lacks (gptjax/compat.py); nothing on current releases
        logging.set_verbosity(logging.ERROR)  # libraries' absl chatter (TFDS, Orbax); gptjax prints its own lines
        with exit_on_user_error():
            main()

    app.run(main_with_one_line_errors, flags_parser=parse_flags)


def parse_own_flags(flag_values: flags.FlagValues, argv: list[str] | None, description: str) -> flags.FlagValues:
    """Parses the flags of a command that is also called as a function with a list of arguments (gptjax.scaling,
    the benchmarks): its own FlagValues, so that importing it defines no global flag, parsed by absl with the same
    --help and one-line errors as every command. Returns `flag_values`, whose attributes are the values."""
    parse_flags([sys.argv[0], *(sys.argv[1:] if argv is None else argv)], flag_values, description)
    return flag_values


def require(ok: bool, message: str) -> None:
    """Raises a UserError with `message` unless `ok`: one line per checked option in the commands' mains."""
    if not ok:
        raise UserError(message)


def check_key(config: ml_collections.ConfigDict, key: str) -> None:
    """Raises a UserError naming `key` and the valid keys beside it if `key` is not in the config."""
    node = config
    path = []
    for part in key.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            valid = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            where = ".".join(path) or "the config"
            raise UserError(f"unknown config key {key!r}: {where} has no {part!r}; valid keys there: {valid}")
        node = node[part]
        path.append(part)


def check_command_line(argv: list[str], default_config: str) -> None:
    """Checks `--config PATH` and every `--config.group.key=value` in argv before absl parses them.

    ml_collections raises on an unknown key while the flag is being defined, and on a missing file only when the
    config is first read, each as a chained traceback; this finds both first and names them in one UserError line.
    """
    path = default_config
    keys = []
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        elif arg.startswith("--config."):
            keys.append(arg[len("--config."):].split("=", 1)[0])
    config = load_config_file(path)
    for key in keys:
        check_key(config, key)


def define_config_flag(default_config: str):
    """The `--config` flag (plus `--config.group.key=value` overrides) of an entry point, checked first.

    Call it under `if __name__ == "__main__":`: ml_collections reads the command line as soon as the flag is
    defined, so the one-line checks of `check_command_line` must run before it.
    """
    from ml_collections import config_flags

    with exit_on_user_error():
        check_command_line(sys.argv[1:], default_config)
    return config_flags.DEFINE_config_file("config", default_config, "Experiment config file (get_config()).",
                                           lock_config=True)
