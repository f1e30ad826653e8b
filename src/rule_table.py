"""The kernels' table of update rules and of their per-step scalars: the one place the
compiled glue reads them from.

``setup.py`` fills the Tempita templates of ``src/`` (``*.pxi.tp``) with these lists
(``generate``), which makes the rule codes, the table columns each rule needs, the
dispatch from a rule code to its span function, the closed-form catch-up of each rule,
the ``Hyper`` struct the loops read, and the ``Scalars`` class Python sets by name, with
its copy into ``Hyper``, its overflow checks and its ``kernel_values``. A rule's element
math is its span function in ``loops.pxi`` (named ``_<name>``, with the signature every
span function has); its specification for Python (defaults, checks, state names, docs) is
in ``ch8fast/rules.py``, whose state names the tests check against the columns here.

Tempita rather than a generator of whole files: the templates are Cython with a few
loops over these lists, so the generated code reads as it is written (scikit-learn's
``_loss.pyx.tp`` is the model), and this file is plain data that the tests import too.
"""

from collections import namedtuple
import os

# A state column of a rule: its state name (as ch8fast.rules names it; "velocity" also
# stands for torch's "momentum_buffer"), the per-step scalar it decays by over a step of
# zero gradient (None: it stays; the catch-up multiplies it by scalar^dt), whether theta
# drifts by it over such steps (momentum's velocity), and the flag (FLAG_*) without which
# the column is absent.
Column = namedtuple("Column", "name decay drift when", defaults=(None, False, None))

# A rule: its name (its code is the upper-case name; its span function ``_<name>``), its
# state columns in the order the kernel takes them, a comment, whether a step of zero
# gradient also applies the decoupled weight decay (theta *= decay^dt in the catch-up), and
# whether steps of zero gradient have a closed form at all (else sparse="catch_up" is
# refused when the optimizer is made).
# A trust-ratio rule (``trust``) runs in two passes: ``_<name>_norms`` updates what the step
# needs and sums, per tensor, theta^2 and u^2 of its update direction u; then ``_<name>``
# applies the step with each tensor's learning rate times its trust ratio.
Rule = namedtuple("Rule", "name columns doc decoupled catch_up trust",
                  defaults=(False, True, False))

RULES = [
    Rule("sgd", [], "theta <- theta - eps g  (Alg 8.1)"),
    Rule("momentum", [Column("velocity", "alpha", drift=True)],
         "v <- alpha v - eps g, theta <- theta + v  (8.15-8.16; shifted Nesterov form "
         "with FLAG_NESTEROV)"),
    Rule("adagrad", [Column("sum")], "r <- r + g g  (Alg 8.4)"),
    Rule("rmsprop", [Column("square_avg", "rho"),
                     Column("grad_avg", "rho", when="FLAG_CENTERED")],
         "r <- rho r + (1 - rho) g g  (Alg 8.5; centered with FLAG_CENTERED)"),
    Rule("rmsprop_momentum", [Column("square_avg", "rho"),
                              Column("velocity", "alpha", drift=True),
                              Column("grad_avg", "rho", when="FLAG_CENTERED")],
         "RMSProp with momentum  (Alg 8.6 with FLAG_NESTEROV)"),
    Rule("adam", [Column("exp_avg", "beta1"), Column("exp_avg_sq", "beta2"),
                  Column("max_exp_avg_sq", when="FLAG_AMSGRAD")],
         "s, r: first and second moments  (Alg 8.7; AMSGrad with FLAG_AMSGRAD)",
         decoupled=True),
    Rule("adadelta", [Column("square_avg", "rho"), Column("acc_delta", "rho")],
         "E[g^2], E[dx^2]  (Zeiler 2012)"),
    # (a zero gradient still moves theta by lr sign(m): no closed form kept here)
    Rule("lion", [Column("exp_avg", "beta2")],
         "theta <- theta - eps sign(b1 m + (1 - b1) g)  (Chen et al. 2023)",
         catch_up=False),
    # (a zero gradient still moves theta by lr m, at each skipped step's lr: none kept)
    Rule("adopt", [Column("exp_avg", "beta1"), Column("exp_avg_sq", "beta2")],
         "m <- b1 m + (1 - b1) g / max(sqrt(v), delta), theta <- theta - eps m, then v "
         "(Taniguchi et al. 2024)", catch_up=False),
    Rule("ademamix", [Column("exp_avg_fast", "beta1"), Column("exp_avg_slow", "beta3"),
                      Column("exp_avg_sq", "beta2")],
         "fast and slow first moments and r: theta <- theta - eps (s_hat + alpha s_slow) / "
         "(sqrt(r_hat) + delta)  (Pagliardini et al. 2024)", decoupled=True),
    # (the arrays hold y, where the gradient is taken; a zero gradient still moves y
    # towards z: no closed form kept here)
    Rule("schedule_free_sgd", [Column("z")],
         "y <- (1 - c) y + c z + eps (beta (1 - c) - 1) g, z <- z - eps g  (Defazio et al. "
         "2024)", catch_up=False),
    Rule("schedule_free_adamw", [Column("z"), Column("exp_avg_sq", "beta2")],
         "the same with g / (sqrt(r_hat) + delta) (Defazio et al. 2024)", catch_up=False),
    # (the trust ratio is of the whole tensor: no row-sparse step, no catch-up)
    Rule("lamb", [Column("exp_avg", "beta1"), Column("exp_avg_sq", "beta2")],
         "u = s_hat / (sqrt(r_hat) + delta) + wd theta, theta <- theta - eps |theta| / |u| "
         "u per tensor  (You et al. 2020)", catch_up=False, trust=True),
    Rule("lars", [Column("velocity", "alpha", drift=True)],
         "u = g + wd theta, v <- alpha v - eps c |theta| / (|u| + e) u, theta <- theta + v "
         "per tensor  (You et al. 2017)", catch_up=False, trust=True),
]

# The per-step scalars, double precision, by name: (name, what it is, default). Python
# sets them on a ``Scalars``; the loops read them from ``Hyper``. Each is checked to fit in
# float32 before a float32 step (it is rounded to the dtype once, in the loop).
Scalar = namedtuple("Scalar", "name doc default")
SCALARS = [
    Scalar("lr", "step size (Adam: lr / (1 - beta1^t), see Scalars.fill)", 0.0),
    Scalar("wd", "L2 coefficient, used with FLAG_L2", 0.0),
    Scalar("decay", "decoupled decay factor applied to p first (1 - lr * wd), else 1", 1.0),
    Scalar("alpha", "momentum of this step", 0.0),
    Scalar("alpha_next", "momentum of the next step: places the next interim point", 0.0),
    Scalar("alpha_prev", "momentum the arrays' interim point was placed with", 0.0),
    Scalar("damp", "FLAG_BUFFER: 1 - dampening, the weight of g in the buffer", 1.0),
    Scalar("rho", "decay of the squared-gradient average (RMSProp, AdaDelta)", 0.0),
    Scalar("beta1", "Adam's decay of the first moment", 0.0),
    Scalar("beta2", "Adam's decay of the second moment", 0.0),
    Scalar("c2", "Adam: 1 / sqrt(1 - beta2^t) (a factor); with FLAG_FMA sqrt(1 - beta2^t) "
           "(a divisor, as torch)", 1.0),
    Scalar("eps", "delta, the denominators' guard", 0.0),
    Scalar("beta3", "AdEMAMix's decay of the slow first moment", 0.0),
    Scalar("mix", "AdEMAMix's alpha, the slow moment's weight (times 1 - beta1^t with "
           "bias_correction, see Scalars.fill)", 0.0),
    Scalar("bound", "ADOPT: the normalized gradient is clamped to [-bound, bound] "
           "(FLAG_BOUND; (t - 1)^clip_exponent at update t, see Scalars.fill)", 0.0),
    Scalar("ck", "schedule-free: c, the weight of z in the new average x (set each step "
           "from the run's weights, see ch8fast._points.AveragePoint)", 0.0),
    Scalar("c1", "1 / (1 - beta1^t) with bias_correction (LAMB's s_hat; the others "
           "fold it into lr)", 1.0),
    Scalar("trust", "trust-ratio rules: the coefficient c of the ratio "
           "c |theta| / (|u| + trust_eps)", 1.0),
    Scalar("trust_eps", "trust-ratio rules: added to |u| in the ratio", 0.0),
]

# The switches of a step, as Python sets them on a ``Scalars`` (name, what it is), and the
# one number that is not a kernel scalar.
SWITCHES = [
    ("l2", "add wd * p to the gradient"),
    ("nesterov", "the shifted Nesterov form"),
    ("amsgrad", "Adam: divide by the running maximum of v"),
    ("bias_correction", "Adam: lr and c2 from the update number t"),
    ("maximize", "ascend: the gradient's sign is flipped first"),
    ("eps_inside", "delta inside the square root (RMSProp, AdaGrad)"),
    ("eps_hat", "Adam: delta added to sqrt(r) before the bias correction"),
    ("centered", "RMSProp: divide by sqrt(r - gbar^2)"),
    ("lookahead", "Nesterov as torch, Keras, optax and scikit-learn write it: the arrays "
     "hold their theta (no interim point)"),
    ("buffer", "momentum buffer, eps outside it (torch, optax)"),
    ("fma", "torch's operation sequence, fused multiply-adds included"),
    ("torch_fused", "torch's fused CPU kernels: their tail rule and sqrt"),
    ("first_fills_v", "the first update sets v <- g*g and leaves m (beta1 1, beta2 0: "
     "ADOPT)"),
    ("bounded", "clamp the normalized gradient to (t - 1)^clip_exponent (ADOPT)"),
    ("corrected_lr", "with bias_correction, lr keeps its value (the correction is c1: "
     "LAMB)"),
]
EXTRA = [("lr_decay", "lr / (1 + (t - 1) lr_decay) at update t (torch Adagrad)"),
         ("clip_exponent", "with bounded: bound = (t - 1)^clip_exponent at update t")]


def columns(rule):
    """The number of table columns ``rule`` needs without its optional ones (param, grad,
    then state)."""
    return 2 + sum(1 for c in rule.columns if c.when is None)


TEMPLATES = ["rules.pxi", "dispatch.pxi", "scalars.pxi"]


def generate(src=os.path.dirname(os.path.abspath(__file__))):
    """Fill each ``src/<name>.tp`` into ``src/<name>`` (only where it changes, so that
    Cython's dependency tracking rebuilds only what depends on it)."""
    from Cython import Tempita
    for name in TEMPLATES:
        with open(os.path.join(src, name + ".tp")) as f:
            text = Tempita.Template(f.read(), name=name + ".tp").substitute(
                RULES=RULES, SCALARS=SCALARS, SWITCHES=SWITCHES, EXTRA=EXTRA,
                columns=columns, enumerate=enumerate, len=len)
        text = ("# Generated from " + name + ".tp and rule_table.py by setup.py: edit "
                "those.\n" + text)
        out = os.path.join(src, name)
        if os.path.exists(out):
            with open(out) as f:
                if f.read() == text:
                    continue
        with open(out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    generate()
