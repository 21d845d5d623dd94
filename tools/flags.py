"""Config objects built from command-line flags: the config dataclass checks the values (one place for every
check), and its error names the flags the user typed instead of the config keys."""

from __future__ import annotations

import re

from core.errors import UserError


def config_from_flags(cls, section: str, flags: dict[str, tuple[str, object]]):
    """cls(field=value, ...) for flags = {field: (flag, value)}; a UserError from cls's own check is raised
    again with `section.field = value` read as `flag value` ("--flag" alone for a true switch) and any
    other mention of `section.field` as `flag`, e.g. "artifact.gptq_damp = 2.0: ..." -> "--damp 2.0: ..."."""
    try:
        return cls(**{field: value for field, (_, value) in flags.items()})
    except UserError as e:
        message = str(e)
        for field, (flag, _) in flags.items():
            key = re.escape(f"{section}.{field}")
            message = re.sub(rf"\b{key} = true\b", flag, message)
            message = re.sub(rf"\b{key}(?:\[\d+\])? = (?!{re.escape(section)}\.)", f"{flag} ", message)  # not a key
            message = re.sub(rf"\b{key}\b", flag, message)
        raise UserError(message) from None
