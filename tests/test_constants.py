"""The constants csrc/ repeats from dsd_kernels/radix.py are radix.py's values: the bracket's
(csrc/select.cpp) and the digit plan (csrc/dsd_cpu.h)."""

import ast
import operator
import re
from pathlib import Path

import torch

from dsd_kernels import radix

CSRC = Path(__file__).parents[1] / "csrc"
BRACKET = ("BRACKETED_NUMEL", "SAMPLE_BLOCK", "SAMPLE_PER_ROOT", "MIN_SAMPLE", "MAX_SAMPLE",
           "SIGMAS", "SLACK_RANKS")
_OPERATORS = {ast.LShift: operator.lshift, ast.Mult: operator.mul, ast.Add: operator.add}


def cpp_value(expression: str):
    """A C++ constant expression of literals, `int64_t{1}`, <<, * and +, as Python's value."""
    def value(node):
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.left), value(node.right))
        raise ValueError(f"not a constant expression: {expression!r}")

    python = re.sub(r"\b(?:u?int\d+_t|size_t)\{(\d+)\}", r"\1", expression)
    return value(ast.parse(python, mode="eval").body)


def select_constants() -> dict:
    """{radix name: (C++ name, C++ type, value)} from select.cpp's lines
    `constexpr TYPE kName = EXPR;  // radix.NAME`."""
    source = (CSRC / "select.cpp").read_text()
    found = re.findall(r"^constexpr (\w+) (k\w+) = ([^;]+);\s*// radix\.(\w+)$", source,
                       re.MULTILINE)
    return {name: (cpp_name, cpp_type, cpp_value(expr))
            for cpp_type, cpp_name, expr, name in found}


def test_cpp_value_reads_the_forms_used():
    assert cpp_value("int64_t{1} << 14") == 1 << 14
    assert cpp_value("4.5") == 4.5 and cpp_value("64") == 64


def test_the_bracket_constants_of_select_cpp_are_radix_py_values():
    constants = select_constants()
    assert sorted(constants) == sorted(BRACKET)
    for name, (cpp_name, cpp_type, value) in constants.items():
        expected = getattr(radix, name)
        assert value == expected, f"{cpp_name} = {value} in select.cpp, radix.{name} = {expected}"
        assert (cpp_type == "double") == isinstance(expected, float), cpp_name


def test_the_fallback_digits_are_radix_py_plan():
    header = (CSRC / "dsd_cpu.h").read_text()
    digits = re.search(r"kDigits\[\] = \{(.*?)\};", header).group(1)
    assert tuple(map(tuple, (map(int, d) for d in re.findall(r"\{(\d+), (\d+)\}", digits)))) \
        == radix.DIGITS
    passes = re.search(r"return dtype == at::kFloat \? (\d) : dtype == at::kHalf \? (\d) : (\d);",
                       header).groups()
    assert tuple(map(int, passes)) == tuple(
        radix.PASSES[d] for d in (torch.float32, torch.float16, torch.bfloat16))
