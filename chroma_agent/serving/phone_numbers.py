"""Phone numbers as carriers' APIs take them: E.164 (a plus, the country code, the number;
no spaces), checked before any request is made with one."""
from __future__ import annotations

import re

E164 = re.compile(r"\+[1-9][0-9]{6,14}")


def is_e164(value: object) -> bool:
    """`value` is a string holding one E.164 number and nothing else."""
    return isinstance(value, str) and E164.fullmatch(value) is not None
