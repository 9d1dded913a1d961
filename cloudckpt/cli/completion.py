"""Shell completion for the cloudckpt command: a bash script generated from the parser
(zsh runs it through ``bashcompinit``). Commands, their options and option choices
complete; anything else completes as a file name."""

from __future__ import annotations

import argparse

SHELLS = ("bash", "zsh")

_TEMPLATE = """\
# cloudckpt completion: eval "$(cloudckpt completion {shell})" in your shell's rc file
{preamble}_cloudckpt() {{
    local cur="${{COMP_WORDS[COMP_CWORD]}}" prev="${{COMP_WORDS[COMP_CWORD-1]}}" cmd="" i
    for ((i = 1; i < COMP_CWORD; i++)); do
        case "${{COMP_WORDS[i]}}" in
            {valued}) ((i++)) ;;
            -*) ;;
            *) cmd="${{COMP_WORDS[i]}}"; break ;;
        esac
    done
    case "$prev" in
{choices}
    esac
    case "$cmd" in
        "") COMPREPLY=($(compgen -W "{top}" -- "$cur")) ;;
{commands}
    esac
}}
complete -o default -F _cloudckpt cloudckpt
"""


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings]


def script(top: argparse.ArgumentParser, shell: str) -> str:
    """The completion script of ``top`` (the cloudckpt parser) for ``shell``."""
    if shell not in SHELLS:
        raise ValueError(f"shell must be one of {', '.join(SHELLS)}, not {shell!r}")
    (commands,) = [a for a in top._actions if isinstance(a, argparse._SubParsersAction)]
    subs: dict[str, argparse.ArgumentParser] = dict(commands.choices)
    every = [a for p in [top, *subs.values()] for a in _options(p)]
    valued = sorted({o for a in _options(top) if a.nargs != 0 for o in a.option_strings})
    choices = {o: a.choices for a in every if a.choices for o in a.option_strings}
    top_words = [*subs, *(o for a in _options(top) for o in a.option_strings)]
    return _TEMPLATE.format(
        shell=shell,
        preamble="autoload -U +X bashcompinit && bashcompinit\n" if shell == "zsh" else "",
        valued="|".join(valued),
        choices="\n".join(
            f'        {o}) COMPREPLY=($(compgen -W "{" ".join(map(str, c))}" -- "$cur")); return ;;'
            for o, c in sorted(choices.items())
        ),
        top=" ".join(top_words),
        commands="\n".join(
            f'        {name}) [[ $cur == -* ]] && COMPREPLY=($(compgen -W "'
            + " ".join(o for a in _options(p) for o in a.option_strings)
            + '" -- "$cur")) ;;'
            for name, p in subs.items()
        ),
    )


def cmd_completion(args: argparse.Namespace) -> int:
    from cloudckpt.cli.parser import parser

    print(script(parser(), args.shell), end="")
    return 0
