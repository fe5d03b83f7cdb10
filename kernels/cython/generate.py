"""kernels/cython/contract.pxi, written by setup.py before cythonize: the contract's constants
(kernels/contract.py pxi_source()) and the activation dispatch generated from its table.

This module imports nothing (setup.py and the tests load it by path, before anything is
built). Adding an activation is a row of contract.ACTIVATION_TABLE plus its f and f' in
activation.pxi, named after the row: ``_f_<name>(z, slope)`` and ``_df_<name>(v, slope)``
(v = the output a = f(z), or z itself when the row's grad_from is "input"). Everything that
switches on an activation code is generated here from the table:
- ``_act_unscale(act)`` / ``_act_from_input(act)``: the row's flags for a code known only at
  run time;
- a tag per row (an empty struct ``act_<name>_tag``) and the fused type ``act_tag`` over them:
  Cython's template mechanism. A loop that takes ``act_tag* tag`` is compiled once per row,
  and in each copy ``_tag_f(z, tag, slope)``, ``_tag_df(v, tag, slope)``,
  ``_tag_unscale(tag)`` and ``_tag_from_input(tag)`` are that row's f, f' and flags, chosen
  when Cython compiles (``act_tag is ...``), so every copy is branch-free and vectorisable
  whatever the C compiler's inlining limits (with the code as a run-time argument GCC stopped
  inlining the loops once the table reached 13 rows: the curve workload's epoch ran 1.8x
  slower);
- the entry points of SPECIALIZED: one case per row calling the loop with that row's tag.
"""

# (entry point, its parameters, the loop it calls with a row's tag {tag}): the loops are
# in epilogue.pxi and batchnorm.pxi; their parameter lists are repeated here.
SPECIALIZED = (
    ("_activate_row", "real* row, real* pre, Py_ssize_t n, int act, real slope",
     "_activate_span(row, pre, n, {tag}, slope)"),
    ("_backward_row_masked",
     "real* grad, real* out, real* pre, uint32_t* w, real* db, Py_ssize_t n, int act, "
     "real slope, uint32_t thr, real scale",
     "_backward_span(grad, out, pre, w, db, n, {tag}, slope, thr, scale)"),
    ("_backward_row_plain",
     "real* grad, real* out, real* pre, uint32_t* w, real* db, Py_ssize_t n, int act, "
     "real slope, real scale",
     "_backward_span(grad, out, pre, w, db, n, {tag}, slope, 0, scale)"),
    ("_backward_noise_row",
     "real* grad, real* pre, uint32_t* w, uint32_t* nwords, Py_ssize_t e0, real* db, "
     "Py_ssize_t n, int act, real slope, uint32_t thr, real scale, int noise, real nstd",
     "_backward_noise_span(grad, pre, w, nwords, e0, db, n, {tag}, slope, thr, scale, noise, "
     "nstd)"),
    ("_activity_row",
     "real* grad, real* out, real* pre, uint32_t* w, uint32_t* nwords, Py_ssize_t e0, "
     "Py_ssize_t n, int act, real slope, uint32_t thr, real scale, int noise, real nstd, "
     "real c1, real c2, bint has1, bint has2, double* sums",
     "_activity_span(grad, out, pre, w, nwords, e0, n, {tag}, slope, thr, scale, noise, "
     "nstd, c1, c2, has1, has2, sums)"),
    ("_bn_act_row",
     "real* row, real* xr, real* pr, real* gam, real* bet, double* mean, double* inv, "
     "Py_ssize_t O, int act, real slope",
     "_bn_act_span(row, xr, pr, gam, bet, mean, inv, O, {tag}, slope)"),
)

NOGIL = "noexcept nogil"


def tag(a):
    """The name of an activation row's tag type."""
    return f"act_{a.name}_tag"


def tag_argument(a):
    """What an entry point passes for the tag: a typed NULL (only its type is read)."""
    return f"<{tag(a)}*>NULL"


def _flag(name, codes):
    test = " or ".join(f"act == {c}" for c in codes) or "False"
    return [f"cdef inline bint {name}(int act) {NOGIL}:", f"    return {test}", ""]


def _tag_flag(name, rows):
    test = " or ".join(f"act_tag is {tag(a)}" for a in rows) or "False"
    return [f"cdef inline bint {name}(act_tag* tag) {NOGIL}:", f"    return {test}", ""]


def _tag_cases(table, body):
    """One compile-time case per row (Cython keeps the one of each copy)."""
    lines = []
    for i, a in enumerate(table):
        lines += [f"    {'if' if i == 0 else 'elif'} act_tag is {tag(a)}:",
                  f"        {body(a)}"]
    return lines


def _cases(table, default, body):
    """An if / elif ladder over the table's rows (the default row last, as the else)."""
    lines, first = [], True
    for a in table:
        if a.code == default.code:
            continue
        lines += [f"    {'if' if first else 'elif'} act == {a.code}:    # {a.name}",
                  f"        {body(a)}"]
        first = False
    if first:
        return [f"    {body(default)}    # {default.name}"]
    return lines + [f"    else:    # {default.name} (and any unknown code)",
                    f"        {body(default)}"]


def activation_dispatch(contract):
    """The generated activation code (module docstring) for the contract module given."""
    table = contract.ACTIVATION_TABLE
    default = contract.ACTIVATION_BY_CODE[contract.ACT_LINEAR]
    lines = ["", "# ---- activations: generated from contract.ACTIVATION_TABLE "
             "(kernels/cython/generate.py)", ""]
    lines += _flag("_act_unscale", [a.code for a in table if a.unscale])
    lines += _flag("_act_from_input", [a.code for a in table if a.grad_from == "input"])
    for a in table:
        lines += [f"ctypedef struct {tag(a)}:", "    char unused", ""]
    lines += ["ctypedef fused act_tag:"] + [f"    {tag(a)}" for a in table] + [""]
    lines += _tag_flag("_tag_unscale", [a for a in table if a.unscale])
    lines += _tag_flag("_tag_from_input", [a for a in table if a.grad_from == "input"])
    for fn, arg, prefix in (("_tag_f", "z", "_f_"), ("_tag_df", "v", "_df_")):
        lines.append(f"cdef inline real {fn}(real {arg}, act_tag* tag, real slope) {NOGIL}:")
        lines += _tag_cases(table, lambda a: f"return {prefix}{a.name}({arg}, slope)")
        lines.append("")
    for name, params, call in SPECIALIZED:
        lines.append(f"cdef void {name}({params}) {NOGIL}:")
        lines += _cases(table, default, lambda a: call.format(tag=tag_argument(a)))
        lines.append("")
    lines += ["# what the extension was built with, checked at import (__init__.py)",
              "ACTIVATION_FLAGS = {" + ", ".join(
                  f"{a.code}: ({int(a.unscale)}, {int(a.grad_from == 'input')})"
                  for a in table) + "}", ""]
    return "\n".join(lines)


def contract_pxi(contract):
    """The whole of contract.pxi for the contract module given."""
    return contract.pxi_source() + activation_dispatch(contract)


def load_by_path(path, name):
    """A module from its file, without importing its package (setup.py, the tests)."""
    import importlib.util
    import sys
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module      # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module
