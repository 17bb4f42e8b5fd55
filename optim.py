"""Optimizers from scratch, learning-rate schedules, gradient clipping and training diagnostics.

Training a language model is minimising L(theta) with noisy gradients g_t = grad L(theta_t) on a
mini-batch. Every optimizer below is one answer to "how far, and in which direction, do I move?":

    SGD        theta <- theta - lr * g                                   (Robbins & Monro 1951)
    momentum   b <- mu*b + g ;  theta <- theta - lr * b                  (Polyak 1964; Nesterov 1983)
    AdaGrad    s <- s + g^2  ;  theta <- theta - lr * g / (sqrt(s)+eps)  (Duchi et al. 2011)
    RMSProp    v <- a*v + (1-a)*g^2 ; theta <- theta - lr * g / (sqrt(v)+eps)   (Tieleman & Hinton 2012)
    Adam       m, v moving averages of g, g^2, bias-corrected           (Kingma & Ba 2015)
    AdamW      Adam + decoupled weight decay theta <- theta*(1 - lr*wd) (Loshchilov & Hutter 2019)
    Lion       theta <- theta - lr * sign(b1*m + (1-b1)*g)               (Chen et al. 2023)
    Muon       theta <- theta - lr * NewtonSchulz(momentum) (orthogonalised update, Jordan et al. 2024)

Each is a torch.optim.Optimizer subclass with the same constructor arguments as its torch.optim
namesake, vectorised over all tensors of a group with torch._foreach_* ops (one kernel launch per
operation for the whole model, like torch's own foreach=True path). Then: parameter groups for
weight decay, LR schedules as pure functions of the step, global-norm clipping, and diagnostics
(gradient norms, update/parameter ratio, activation statistics, loss-spike detection).

    python optim.py            # trains the same tiny GPT with every optimizer and prints a table
    python optim.py --help

The optimizers, schedules and diagnostics need only torch; model.py and lib are used by the demo alone.
"""
import signal
if __name__ == "__main__" and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, signal.SIG_DFL)   # Ctrl-C while torch loads: end at once (then cli.run)
import math
import statistics
import time
from collections import deque
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn


# ----------------------------------------------------------------------------------------------
# Optimizers
# ----------------------------------------------------------------------------------------------

def _check_supported(name, differentiable=False, fused=None, capturable=False):
    """Torch's engineering switches are accepted (same signature) but only their defaults work."""
    if differentiable or fused or capturable:
        raise ValueError(f"optim.py {name}: differentiable/fused/capturable are not implemented here; "
                         "use torch.optim for those")


def _check_nonneg(name, **values):
    for key, value in values.items():
        if not 0.0 <= value:
            raise ValueError(f"optim.py {name}: invalid {key} {value!r} (must be >= 0)")


def _params_and_grads(name, group):
    """The tensors of a group that have a gradient, and those gradients (negated to maximise)."""
    params = [p for p in group["params"] if p.grad is not None]
    grads = [p.grad for p in params]
    if any(g.is_sparse for g in grads):
        raise RuntimeError(f"optim.py {name}: sparse gradients are not supported")
    if group.get("maximize", False) and grads:
        grads = torch._foreach_neg(grads)
    return params, grads


class _Optimizer(torch.optim.Optimizer):
    """Shared step(): run the closure, then apply `_update` to every param group."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads = _params_and_grads(type(self).__name__, group)
            if params:
                self._update(group, params, grads)
        return loss

    def _steps(self, params):
        """Increment and return the per-tensor step count t (tensors may join a run late)."""
        steps = []
        for p in params:
            state = self.state[p]
            state["step"] = int(state.get("step", 0)) + 1      # int() also reads torch.optim states
            steps.append(state["step"])
        return steps

    def _buffers(self, params, key, init):
        """Per-tensor state buffer `key`, created by `init(p)` the first time a tensor is seen."""
        buffers = []
        for p in params:
            state = self.state[p]
            if key not in state:
                state[key] = init(p)
            buffers.append(state[key])
        return buffers


class SGD(_Optimizer):
    """Stochastic gradient descent with optional momentum, Nesterov momentum and L2 weight decay.

        g <- g + wd * theta                            (L2 penalty folded into the gradient)
        b_1 = g_1 ;  b_t = mu * b_{t-1} + (1 - dampening) * g_t          (heavy ball, Polyak)
        d = g + mu * b  (nesterov)   or   d = b  (heavy ball)   or   d = g  (mu = 0)
        theta <- theta - lr * d

    Same arguments and conventions as torch.optim.SGD (the first buffer is g itself, undamped).
    """

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False, *,
                 maximize=False, foreach=None, differentiable=False, fused=None):
        _check_supported("SGD", differentiable, fused)
        _check_nonneg("SGD", lr=lr, momentum=momentum, weight_decay=weight_decay)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("optim.py SGD: nesterov=True needs momentum > 0 and dampening = 0")
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                      weight_decay=weight_decay, nesterov=nesterov, maximize=maximize))

    def _update(self, group, params, grads):
        lr, mu, wd = float(group["lr"]), group["momentum"], group["weight_decay"]
        if wd != 0:
            grads = torch._foreach_add(grads, params, alpha=wd)           # g + wd * theta
        if mu != 0:
            bufs = [self.state[p].get("momentum_buffer") for p in params]
            old = [i for i, b in enumerate(bufs) if b is not None]
            if old:                                                       # b <- mu*b + (1-damp)*g
                torch._foreach_mul_([bufs[i] for i in old], mu)
                torch._foreach_add_([bufs[i] for i in old], [grads[i] for i in old],
                                    alpha=1 - group["dampening"])
            for i, buf in enumerate(bufs):                                # b_1 = g_1
                if buf is None:
                    bufs[i] = self.state[params[i]]["momentum_buffer"] = grads[i].detach().clone()
            if group["nesterov"]:
                grads = torch._foreach_add(grads, bufs, alpha=mu)         # d = g + mu * b
            else:
                grads = bufs                                              # d = b
        torch._foreach_add_(params, grads, alpha=-lr)                     # theta -= lr * d


class Adagrad(_Optimizer):
    """AdaGrad: per-coordinate step sizes from the sum of all past squared gradients.

        g <- g + wd * theta ;   s_t = s_{t-1} + g_t^2    (s_0 = initial_accumulator_value)
        lr_t = lr / (1 + (t - 1) * lr_decay)
        theta <- theta - lr_t * g_t / (sqrt(s_t) + eps)

    The sum only grows, so steps shrink forever: good for sparse convex problems, too timid for
    deep nets (the motivation for RMSProp's moving average).
    """

    def __init__(self, params, lr=1e-2, lr_decay=0, weight_decay=0, initial_accumulator_value=0,
                 eps=1e-10, foreach=None, *, maximize=False, differentiable=False, fused=None):
        _check_supported("Adagrad", differentiable, fused)
        _check_nonneg("Adagrad", lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                      initial_accumulator_value=initial_accumulator_value, eps=eps)
        super().__init__(params, dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                                      initial_accumulator_value=initial_accumulator_value, eps=eps,
                                      maximize=maximize))

    def _update(self, group, params, grads):
        init = group["initial_accumulator_value"]
        steps = self._steps(params)
        sums = self._buffers(params, "sum", lambda p: torch.full_like(p, init))
        if group["weight_decay"] != 0:
            grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
        torch._foreach_addcmul_(sums, grads, grads, value=1)              # s += g^2
        std = torch._foreach_sqrt(sums)
        torch._foreach_add_(std, group["eps"])                            # sqrt(s) + eps
        minus_lr = [-float(group["lr"]) / (1 + (t - 1) * group["lr_decay"]) for t in steps]
        torch._foreach_addcdiv_(params, grads, std, minus_lr)             # theta -= lr_t g / std


class RMSprop(_Optimizer):
    """RMSProp: divide by a moving root-mean-square of recent gradients (Tieleman & Hinton 2012).

        g <- g + wd * theta ;   v_t = alpha * v_{t-1} + (1 - alpha) * g_t^2
        centered:  gbar_t = alpha * gbar_{t-1} + (1 - alpha) * g_t ;  v_t <- v_t - gbar_t^2
        d = g_t / (sqrt(v_t) + eps)
        momentum:  b_t = mu * b_{t-1} + d ;  theta <- theta - lr * b_t    else theta <- theta - lr * d
    """

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0, momentum=0,
                 centered=False, capturable=False, foreach=None, maximize=False, differentiable=False):
        _check_supported("RMSprop", differentiable, None, capturable)
        _check_nonneg("RMSprop", lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                      momentum=momentum)
        super().__init__(params, dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                                      momentum=momentum, centered=centered, maximize=maximize))

    def _update(self, group, params, grads):
        alpha, lr = group["alpha"], float(group["lr"])
        self._steps(params)
        square_avgs = self._buffers(params, "square_avg", torch.zeros_like)
        if group["weight_decay"] != 0:
            grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
        torch._foreach_mul_(square_avgs, alpha)
        torch._foreach_addcmul_(square_avgs, grads, grads, value=1 - alpha)   # v = a v + (1-a) g^2
        if group["centered"]:
            grad_avgs = self._buffers(params, "grad_avg", torch.zeros_like)
            torch._foreach_lerp_(grad_avgs, grads, 1 - alpha)                  # gbar = a gbar + (1-a) g
            avg = torch._foreach_addcmul(square_avgs, grad_avgs, grad_avgs, value=-1)
            torch._foreach_sqrt_(avg)                                          # sqrt(v - gbar^2)
        else:
            avg = torch._foreach_sqrt(square_avgs)
        torch._foreach_add_(avg, group["eps"])
        if group["momentum"] > 0:
            bufs = self._buffers(params, "momentum_buffer", torch.zeros_like)
            torch._foreach_mul_(bufs, group["momentum"])
            torch._foreach_addcdiv_(bufs, grads, avg)                          # b = mu b + g / avg
            torch._foreach_add_(params, bufs, alpha=-lr)
        else:
            torch._foreach_addcdiv_(params, grads, avg, value=-lr)


class Adam(_Optimizer):
    """Adam (Kingma & Ba 2015): momentum divided by an RMS of gradients, both bias-corrected.

        g <- g + wd * theta                       (coupled L2; decoupled_weight_decay=True is AdamW)
        m_t = b1 * m_{t-1} + (1 - b1) * g_t       v_t = b2 * v_{t-1} + (1 - b2) * g_t^2
        m_hat = m_t / (1 - b1^t)                  v_hat = v_t / (1 - b2^t)
        theta <- theta - lr * m_hat / (sqrt(v_hat) + eps)

    The first step moves every coordinate by lr * g / (|g| + eps) ~ lr * sign(g): Adam's step
    size is set by lr, not by the gradient's scale (so multiplying the loss by c changes nothing).
    amsgrad=True uses max_{s<=t} v_s in place of v_t (Reddi et al. 2018).
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False,
                 *, foreach=None, maximize=False, capturable=False, differentiable=False, fused=None,
                 decoupled_weight_decay=False):
        name = type(self).__name__
        _check_supported(name, differentiable, fused, capturable)
        _check_nonneg(name, lr=lr, eps=eps, weight_decay=weight_decay)
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"optim.py {name}: invalid betas {betas!r} (each must be in [0, 1))")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      amsgrad=amsgrad, maximize=maximize,
                                      decoupled_weight_decay=decoupled_weight_decay))

    def _update(self, group, params, grads):
        (beta1, beta2), lr, wd = group["betas"], float(group["lr"]), group["weight_decay"]
        steps = self._steps(params)
        exp_avgs = self._buffers(params, "exp_avg", torch.zeros_like)         # m
        exp_avg_sqs = self._buffers(params, "exp_avg_sq", torch.zeros_like)   # v
        if wd != 0 and group["decoupled_weight_decay"]:
            torch._foreach_mul_(params, 1 - lr * wd)                          # theta *= 1 - lr wd
        elif wd != 0:
            grads = torch._foreach_add(grads, params, alpha=wd)               # g += wd theta
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)                      # m = b1 m + (1-b1) g
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)   # v = b2 v + (1-b2) g^2
        if group["amsgrad"]:
            max_sqs = self._buffers(params, "max_exp_avg_sq", torch.zeros_like)
            torch._foreach_maximum_(max_sqs, exp_avg_sqs)                     # v = max_s v_s
            exp_avg_sqs = max_sqs
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, [math.sqrt(1 - beta2 ** t) for t in steps])  # sqrt(v_hat)
        torch._foreach_add_(denom, group["eps"])                              # sqrt(v_hat) + eps
        step_sizes = [-lr / (1 - beta1 ** t) for t in steps]                  # lr / (1 - b1^t)
        torch._foreach_addcdiv_(params, exp_avgs, denom, step_sizes)          # theta -= lr m_hat/denom


class AdamW(Adam):
    """AdamW (Loshchilov & Hutter 2019): Adam with weight decay decoupled from the gradient.

        theta <- theta * (1 - lr * wd)            then the Adam step with g (not g + wd*theta)

    With coupled L2 (Adam's weight_decay) the decay term is divided by sqrt(v_hat) like the
    gradient, so parameters with large gradients are barely decayed; AdamW decays all equally.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, *, maximize=False, foreach=None, capturable=False,
                 differentiable=False, fused=None):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, maximize=maximize, capturable=capturable,
                         differentiable=differentiable, fused=fused, decoupled_weight_decay=True)


class Lion(_Optimizer):
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms").

        c_t = sign(b1 * m_{t-1} + (1 - b1) * g_t)          (every coordinate moves by exactly lr)
        theta <- theta * (1 - lr * wd) - lr * c_t
        m_t = b2 * m_{t-1} + (1 - b2) * g_t

    One state buffer instead of Adam's two; because |update| = lr per coordinate, it wants an lr
    3-10x smaller than AdamW's and a weight decay 3-10x larger.
    """

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, *, maximize=False):
        _check_nonneg("Lion", lr=lr, weight_decay=weight_decay)
        if not (0.0 <= betas[0] <= 1.0 and 0.0 <= betas[1] <= 1.0):
            raise ValueError(f"optim.py Lion: invalid betas {betas!r} (each must be in [0, 1])")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay,
                                      maximize=maximize))

    def _update(self, group, params, grads):
        (beta1, beta2), lr, wd = group["betas"], float(group["lr"]), group["weight_decay"]
        exp_avgs = self._buffers(params, "exp_avg", torch.zeros_like)         # m
        if wd != 0:
            torch._foreach_mul_(params, 1 - lr * wd)
        update = torch._foreach_lerp(exp_avgs, grads, 1 - beta1)              # b1 m + (1-b1) g
        torch._foreach_sign_(update)
        torch._foreach_add_(params, update, alpha=-lr)                        # theta -= lr sign(.)
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta2)                      # m = b2 m + (1-b2) g


NS_QUINTIC = (3.4445, -4.7750, 2.0315)   # Muon's coefficients: fast, approximate orthogonalisation
NS_CUBIC = (1.5, -0.5, 0.0)              # classical Newton-Schulz: slow, converges to U V^T exactly


def newton_schulz(G, steps=5, coeffs=NS_QUINTIC, eps=1e-7):
    """Approximate the orthogonal factor U V^T of G = U S V^T without an SVD.

        X_0 = G / ||G||_F          (all singular values now in (0, 1])
        X_{k+1} = a X + b (X X^T) X + c (X X^T)^2 X   =   U p(S_k) V^T,   p(s) = a s + b s^3 + c s^5

    An odd matrix polynomial keeps the singular vectors and maps each singular value through the
    scalar polynomial p, so iterating pushes every singular value towards 1. Works on a (..., m, n)
    batch; iterates on the wide orientation so X X^T is the smaller Gram matrix.
    """
    a, b, c = coeffs
    X = G.to(torch.promote_types(G.dtype, torch.float32))           # (..., m, n), >= fp32
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT                                                    # (..., n, m), now wide
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        A = X @ X.mT                                                # (..., m, m)
        X = a * X + (b * A + c * A @ A) @ X
    if transposed:
        X = X.mT
    return X.to(G.dtype)


class Muon(_Optimizer):
    """Muon (K. Jordan et al. 2024): orthogonalised momentum for the 2-D weight matrices.

        b_t = mu * b_{t-1} + (1 - mu) * g_t ;    d = (1 - mu) g_t + mu b_t  (nesterov)  or  b_t
        theta <- theta * (1 - lr * wd) - lr * sqrt(max(1, rows/cols)) * NewtonSchulz(d)

    Every singular value of the update is ~1: the step has the same size in every direction of
    the matrix. Use it for hidden matrices only; embeddings, the output head, norms and biases go
    to AdamW (see muon_param_split). Loops over tensors: the matmuls dominate, not launches.
    """

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, weight_decay=0.0):
        _check_nonneg("Muon", lr=lr, momentum=momentum, weight_decay=weight_decay)
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                                      weight_decay=weight_decay))

    def _update(self, group, params, grads):
        lr, mu, wd = float(group["lr"]), group["momentum"], group["weight_decay"]
        bufs = self._buffers(params, "momentum_buffer", torch.zeros_like)
        for p, g, buf in zip(params, grads, bufs):
            if p.ndim != 2:
                raise ValueError(f"optim.py Muon: got a {p.ndim}-D tensor of shape {tuple(p.shape)}; "
                                 "Muon is for 2-D matrices, give the rest to AdamW")
            buf.lerp_(g, 1 - mu)                                      # b = mu b + (1-mu) g
            d = g.lerp(buf, mu) if group["nesterov"] else buf
            scale = max(1.0, p.size(0) / p.size(1)) ** 0.5
            p.mul_(1 - lr * wd)
            p.add_(newton_schulz(d, group["ns_steps"]), alpha=-lr * scale)


# ----------------------------------------------------------------------------------------------
# Parameter groups: decay every matrix (embeddings included), never a norm gain or a bias
# ----------------------------------------------------------------------------------------------

def weight_decay_groups(model, weight_decay=0.1):
    """Two param groups: {every matrix, weight_decay} and {gains and biases, 0.0}, each with its
    "names". The project's one rule (sft.py follows it too):

        decay theta  <=>  theta.ndim >= 2      (linear weights, embeddings, a tied output matrix)

    Why: decay shrinks weights towards 0, a prior that bounds a matrix's norm. An embedding table
    is a matrix like any other, and with tied embeddings it IS the output matrix, the one whose
    norm sets the logits' scale (nanoGPT and GPT-3 decay it). A norm gain or a bias (ndim < 2) only
    scales or shifts; there is nothing to regularise, and decaying it pulls the function itself
    towards zero (a gain at 0 switches its layer off). Frozen parameters are left out; a parameter
    shared between modules appears once (named_parameters de-duplicates).
    """
    decay, rest = ([], []), ([], [])
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        bucket = decay if p.ndim >= 2 else rest
        bucket[0].append(name)
        bucket[1].append(p)
    return [{"params": decay[1], "names": decay[0], "weight_decay": weight_decay},
            {"params": rest[1], "names": rest[0], "weight_decay": 0.0}]


def _embedding_and_norm_ids(model):
    """ids of the parameters of embedding tables and of norms (a module whose class name contains
    "norm"): matrices that Muon leaves to AdamW."""
    ids = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding) or "norm" in type(module).__name__.lower():
            ids.update(id(p) for p in module.parameters(recurse=False))
    return ids


def muon_param_split(model):
    """(hidden 2-D matrices for Muon, everything else for AdamW): embeddings, norms, biases and
    the output head (any parameter named "lm_head...") stay with AdamW, as in the Muon reference.
    (Which tensors Muon orthogonalises is a separate question from which ones are decayed.)"""
    skip = _embedding_and_norm_ids(model)
    hidden, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            is_hidden = p.ndim == 2 and id(p) not in skip and not name.startswith("lm_head")
            (hidden if is_hidden else rest).append(p)
    return hidden, rest


# ----------------------------------------------------------------------------------------------
# Learning-rate schedules: pure functions of the step t = 1, 2, ..., total_steps
# ----------------------------------------------------------------------------------------------

def _warmup(step, lr, warmup_steps, min_lr):
    """Linear warmup from min_lr at step 0 to lr at step warmup_steps."""
    return min_lr + (lr - min_lr) * step / warmup_steps


def lr_constant(step, lr, warmup_steps=0, min_lr=0.0):
    """lr(t) = min_lr + (lr - min_lr) * t / W for t < W (linear warmup), then lr."""
    if step < warmup_steps:
        return _warmup(step, lr, warmup_steps, min_lr)
    return lr


def lr_cosine(step, lr, total_steps, warmup_steps=0, min_lr=0.0):
    """Warmup, then half a cosine from lr to min_lr at total_steps (Loshchilov & Hutter 2017):

        lr(t) = min_lr + (lr - min_lr) * (1 + cos(pi * (t - W) / (T - W))) / 2,   W <= t <= T
    """
    if step < warmup_steps:
        return _warmup(step, lr, warmup_steps, min_lr)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def lr_linear(step, lr, total_steps, warmup_steps=0, min_lr=0.0):
    """Warmup, then a straight line from lr to min_lr at total_steps:

        lr(t) = lr - (lr - min_lr) * (t - W) / (T - W),   W <= t <= T
    """
    if step < warmup_steps:
        return _warmup(step, lr, warmup_steps, min_lr)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return lr - (lr - min_lr) * progress


def lr_wsd(step, lr, total_steps, warmup_steps=0, decay_frac=0.2, min_lr=0.0):
    """Warmup-Stable-Decay (Hu et al. 2024, MiniCPM): warmup, hold lr, then decay linearly to
    min_lr over the last decay_frac of training. The stable phase can be extended (or branched
    into a decay at any point) without knowing the total length in advance.

        lr(t) = lr for W <= t < D,   lr - (lr - min_lr) * (t - D) / (T - D) for D <= t <= T,
        D = T - max(1, round(decay_frac * T))
    """
    if step < warmup_steps:
        return _warmup(step, lr, warmup_steps, min_lr)
    decay_steps = max(1, round(decay_frac * total_steps)) if decay_frac > 0 else 0
    decay_start = max(warmup_steps, total_steps - decay_steps)
    if step < decay_start:
        return lr
    progress = min(1.0, (step - decay_start) / max(1, total_steps - decay_start))
    return lr - (lr - min_lr) * progress


SCHEDULES = {"constant": lr_constant, "cosine": lr_cosine, "linear": lr_linear, "wsd": lr_wsd}


def scale_lr(optimizer, factor):
    """Set every group's lr to its peak lr times `factor` (a schedule called with lr=1.0).

    The peak is the group's lr the first time this is called, kept in group["initial_lr"] as
    torch's own LR schedulers do, so groups with different peaks (Muon + AdamW) keep their ratio.
    """
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
        group["lr"] = group["initial_lr"] * factor


# ----------------------------------------------------------------------------------------------
# Gradient clipping
# ----------------------------------------------------------------------------------------------

def clip_grad_norm_(params, max_norm):
    """Rescale all gradients together so that their global L2 norm is at most max_norm.

        N = sqrt(sum_i ||g_i||^2) ;   g_i <- g_i * min(1, max_norm / N)

    Returns N before clipping (a 0-d tensor; the number to log as grad_norm). Directions are
    unchanged and no host-device sync happens. A non-finite N makes the gradients non-finite:
    check the returned norm before stepping.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    norms = torch._foreach_norm(grads)                                # ||g_i||
    total = torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))
    coef = (max_norm / total.clamp_min(torch.finfo(total.dtype).tiny)).clamp(max=1.0)
    torch._foreach_mul_(grads, coef.to(grads[0].dtype))
    return total


# ----------------------------------------------------------------------------------------------
# Diagnostics: what practitioners look at to judge a run's health
# ----------------------------------------------------------------------------------------------

def _exact(x):
    """x detached, in at least float32 (bf16 statistics are too coarse to read)."""
    return x.detach().to(torch.promote_types(x.dtype, torch.float32))


def layer_of(name):
    """Group a parameter name into its layer: up to the first integer index ("blocks.3.attn.w"
    -> "blocks.3"), else its first component ("wte.weight" -> "wte")."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return parts[0]


def grad_norms(model):
    """(global gradient L2 norm, {layer: gradient L2 norm}) with global^2 = sum of layer^2."""
    per_layer = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            layer = layer_of(name)
            per_layer[layer] = per_layer.get(layer, 0.0) + _exact(p.grad).pow(2).sum().item()
    total = math.sqrt(sum(per_layer.values()))
    return total, {layer: math.sqrt(sq) for layer, sq in per_layer.items()}


def snapshot(model):
    """Copies of every parameter, to measure an update afterwards: {name: tensor}."""
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def update_ratios(before, model):
    """Update-to-parameter ratio ||theta_after - theta_before|| / ||theta_before|| per layer.

    A common rule of thumb (Karpathy): about 1e-3 per step on healthy Adam runs; ~1e-1 means the
    lr is far too high, ~1e-5 that the layer is barely learning.
    """
    delta_sq, param_sq = {}, {}
    for name, p in model.named_parameters():
        if name in before:
            layer = layer_of(name)
            old = _exact(before[name])
            delta_sq[layer] = delta_sq.get(layer, 0.0) + (_exact(p) - old).pow(2).sum().item()
            param_sq[layer] = param_sq.get(layer, 0.0) + old.pow(2).sum().item()
    return {layer: math.sqrt(delta_sq[layer]) / max(math.sqrt(param_sq[layer]), 1e-12)
            for layer in delta_sq}


def activation_stats(x, dead_eps=0.0, saturation=0.99):
    """Statistics of one activation tensor (..., C) with C units (features):

        mean, std        over all entries
        dead             fraction of the C units with |x| <= dead_eps on every token of the batch
                         (a ReLU unit that never fires gets no gradient and never recovers)
        saturated        fraction of entries with |x| >= saturation (tanh/sigmoid-like units in
                         their flat region pass almost no gradient)
    """
    x = _exact(x)
    units = x.reshape(-1, x.shape[-1])                                   # (N, C)
    n_dead = (units.abs() <= dead_eps).all(dim=0).sum().item()
    n_saturated = (x.abs() >= saturation).sum().item()
    return {"mean": x.mean().item(), "std": x.std(unbiased=False).item(),
            "dead": n_dead / units.shape[1], "saturated": n_saturated / x.numel()}


class ActivationStats:
    """Forward hooks that record activation_stats of chosen modules on every forward pass.

        stats = ActivationStats(model, select=lambda name, m: isinstance(m, nn.ReLU))
        model(x); stats.stats  ->  {module name: {"mean", "std", "dead", "saturated"}}
        stats.remove()

    on="output" records what a module returns; on="input" what it receives (e.g. the input of an
    MLP's down-projection is the hidden activation even when the nonlinearity is a function).
    """

    def __init__(self, model, select, on="output", dead_eps=0.0, saturation=0.99):
        if on not in ("input", "output"):
            raise ValueError(f"optim.py ActivationStats: on must be 'input' or 'output', got {on!r}")
        self.stats, self.handles = {}, []
        for name, module in model.named_modules():
            if select(name, module):
                self.handles.append(module.register_forward_hook(self._hook(name, on, dead_eps,
                                                                            saturation)))

    def _hook(self, name, on, dead_eps, saturation):
        def hook(module, inputs, output):
            x = inputs[0] if on == "input" else output
            if torch.is_tensor(x):
                self.stats[name] = activation_stats(x, dead_eps, saturation)
        return hook

    def remove(self):
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


class LossSpikeDetector:
    """Flags a loss that sits far above the recent past, robustly:

        spike  <=>  loss is not finite,  or  loss > median(W) + k * 1.4826 * MAD(W)  and  loss >
                    median(W) * (1 + min_rel)

    over the last `window` losses W (MAD = median |l - median|; 1.4826 * MAD estimates the standard
    deviation of a normal and is not inflated by earlier spikes). Needs `min_history` losses
    first. A spike's loss is kept out of W so a burst of spikes does not raise the bar.
    """

    def __init__(self, window=50, k=6.0, min_rel=0.05, min_history=10):
        self.window, self.k, self.min_rel, self.min_history = window, k, min_rel, min_history
        self.history = deque(maxlen=window)
        self.n_spikes = 0

    def update(self, loss):
        loss = float(loss)
        spike = not math.isfinite(loss)
        if not spike and len(self.history) >= self.min_history:
            median = statistics.median(self.history)
            mad = statistics.median(abs(x - median) for x in self.history)
            spike = loss > median + self.k * 1.4826 * mad and loss > median * (1 + self.min_rel)
        if spike:
            self.n_spikes += 1
        else:
            self.history.append(loss)
        return spike


def format_metrics(step, **metrics):
    """One log line: 'step 120 | loss 2.3410 | lr 3.00e-04 | grad_norm 0.8123 | ...'."""
    parts = [f"step {step}"]
    for key, value in metrics.items():
        if isinstance(value, bool) or isinstance(value, int):
            parts.append(f"{key} {value}")
        elif isinstance(value, float) or torch.is_tensor(value):
            value = float(value)
            tiny_or_huge = value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5)
            text = f"{value:.2e}" if tiny_or_huge else f"{value:.4f}"
            parts.append(f"{key} {text}")
        else:
            parts.append(f"{key} {value}")
    return " | ".join(parts)


# ----------------------------------------------------------------------------------------------
# Demo: the same tiny GPT on the same synthetic data with every optimizer
# ----------------------------------------------------------------------------------------------

@dataclass
class Args:
    steps: int = 200              # training steps per optimizer
    batch_size: int = 16          # sequences per step
    seq_len: int = 32             # tokens per sequence
    symbols: int = 16             # K: alphabet size of the synthetic rule
    noise: float = 0.1            # probability that a token ignores the rule (sets the loss floor)
    n_layer: int = 2              # transformer blocks
    n_embd: int = 64              # residual width
    n_head: int = 4               # attention heads
    warmup: int = 20              # linear warmup steps, then cosine decay to 0.1 x peak
    weight_decay: float = 0.1     # decoupled decay on every matrix, embeddings included (AdamW, Lion x10, Muon)
    clip: float = 1.0             # global gradient-norm clip (0 = off)
    target: float = 0.0           # held-out loss for "steps to target"; 0 = loss floor + 0.3 nats
    eval_every: int = 10          # steps between held-out evaluations
    eval_size: int = 64           # held-out sequences (the same for every run)
    lr_scale: float = 1.0         # multiply every optimizer's peak lr (for sweeps)
    optimizers: str = "all"       # all, or some of sgd, sgd-momentum, sgd-nesterov, adagrad, rmsprop, adam, adamw, torch-adamw, lion, muon (comma-separated, any case)
    beta_steps: int = 120         # steps per run of the AdamW beta2 x warmup experiment (0 = skip)
    beta_lr: float = 3e-2         # peak lr of that experiment (3x AdamW's best: where it matters)
    beta_seeds: int = 2           # data/init seeds averaged in that experiment
    timing_rounds: int = 20       # interleaved rounds of the optimizer.step() micro-benchmark
    out_dir: str = "runs/optim"   # results.json, metrics.jsonl and args.json go here
    threads: int = 1              # torch CPU threads (0 = torch default); a model this small is fastest on 1
    device: str = "auto"          # auto | cpu | cuda
    seed: int = 0                 # seed of the rule, the data and the model initialisation


def make_rule(symbols, generator):
    """A random second-order rule: rule[a, b] is the token that follows the pair (a, b)."""
    return torch.randint(0, symbols, (symbols, symbols), generator=generator)      # (K, K)


def sample_sequences(rule, n, seq_len, noise, generator):
    """x_0, x_1 ~ U{K};  x_t = rule[x_{t-2}, x_{t-1}] with probability 1 - noise, else ~ U{K}."""
    K = rule.shape[0]
    x = torch.randint(0, K, (n, seq_len), generator=generator)                     # (n, T)
    follows_rule = torch.rand(n, seq_len, generator=generator) >= noise
    for t in range(2, seq_len):
        x[:, t] = torch.where(follows_rule[:, t], rule[x[:, t - 2], x[:, t - 1]], x[:, t])
    return x


def loss_floor(symbols, noise, seq_len):
    """The lowest reachable mean cross-entropy (nats) over the T-1 predicted tokens:
    x_1 is uniform (log K); each later token is the rule's with probability p = 1 - noise + noise/K
    and each other symbol with q = noise/K, entropy H = -p log p - (K-1) q log q."""
    p, q = 1 - noise + noise / symbols, noise / symbols
    H = -p * math.log(p) - ((symbols - 1) * q * math.log(q) if q > 0 else 0.0)
    return (math.log(symbols) + (seq_len - 2) * H) / (seq_len - 1)


# name: (peak lr, factory(model, lr, weight_decay) -> optimizers). Each peak lr is the best of a
# sweep over x1/3, x1, x3 (x9 where x3 won) at the default config; "torch AdamW" is the baseline.
RECIPES = {
    "SGD": (0.5, lambda m, lr, wd: [SGD(m.parameters(), lr=lr)]),
    "SGD momentum": (0.3, lambda m, lr, wd: [SGD(m.parameters(), lr=lr, momentum=0.9)]),
    "SGD nesterov": (0.3, lambda m, lr, wd: [SGD(m.parameters(), lr=lr, momentum=0.9, nesterov=True)]),
    "Adagrad": (3e-2, lambda m, lr, wd: [Adagrad(m.parameters(), lr=lr)]),
    "RMSprop": (3e-3, lambda m, lr, wd: [RMSprop(m.parameters(), lr=lr)]),
    "Adam": (1e-2, lambda m, lr, wd: [Adam(m.parameters(), lr=lr, betas=(0.9, 0.95))]),
    "AdamW": (1e-2, lambda m, lr, wd: [AdamW(weight_decay_groups(m, wd), lr=lr, betas=(0.9, 0.95))]),
    "torch AdamW": (1e-2, lambda m, lr, wd: [torch.optim.AdamW(weight_decay_groups(m, wd), lr=lr,
                                                                 betas=(0.9, 0.95), foreach=True)]),
    "Lion": (3e-3, lambda m, lr, wd: [Lion(weight_decay_groups(m, 10 * wd), lr=lr, betas=(0.9, 0.99))]),
    "Muon": (6e-2, lambda m, lr, wd: [Muon(muon_param_split(m)[0], lr=lr, weight_decay=wd),
                                      AdamW(muon_param_split(m)[1], lr=3e-3, betas=(0.9, 0.95),
                                            weight_decay=0.0)]),
}
BASELINE = "torch AdamW"
MAX_LR_SCALE = 100.0     # --lr-scale: a sweep factor around the tuned rates; 100x is far outside any useful sweep


def recipe_key(name):
    """The name --optimizers accepts for a recipe: lower case, words joined by hyphens, so that case,
    spaces, underscores and hyphens do not matter ('SGD momentum' = 'sgd_momentum' = 'sgd-momentum')."""
    return "-".join(name.lower().replace("_", " ").replace("-", " ").split())


RECIPE_KEYS = {recipe_key(name): name for name in RECIPES}     # 'sgd-momentum' -> 'SGD momentum'


def select_recipes(spec):
    """--optimizers -> the RECIPES names it selects, in order, each once: 'all', or a comma-separated
    list of recipe keys (recipe_key). An unknown or empty name is a ValueError listing the accepted
    ones."""
    if recipe_key(spec) == "all":
        return list(RECIPES)
    names = []
    for item in spec.split(","):
        name = RECIPE_KEYS.get(recipe_key(item))
        if name is None:
            raise ValueError(f"--optimizers: unknown optimizer {item.strip()!r}; choose from all, "
                             + ", ".join(RECIPE_KEYS) + " (comma-separated)")
        if name not in names:
            names.append(name)
    return names


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def evaluate(net, eval_data, device):
    """Mean next-token cross-entropy on held-out sequences (B, T)."""
    import model as M
    import torch.nn.functional as F

    net.eval()
    x = eval_data.to(device)
    with torch.no_grad(), M.autocast(device):
        logits = net(x[:, :-1])                                                     # (B, T-1, K)
    net.train()
    return F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].reshape(-1)).item()


def train(args, cfg, data, eval_data, optimizers, device, warmup, name, logger=None, echo=False, seed=None):
    """Train a fresh model (seeded, so every run starts from the same weights) on `data`
    ((steps, B, T) tokens) with the optimizers `optimizers(model)` returns, a warmup + cosine
    schedule and optional clipping. An update that leaves a weight NaN, inf or past cli.MAX_WEIGHT stops
    it (cli.NonFiniteError naming the run and step): a diverged run is an error, not a row of NaN.
    Returns the curves, per-step wall times and diagnostics."""
    import model as M
    import torch.nn.functional as F
    from lib import cli

    torch.manual_seed(args.seed if seed is None else seed)
    net = M.GPT(cfg).to(device)
    opts = optimizers(net)
    params = [p for p in net.parameters() if p.requires_grad]
    spikes = LossSpikeDetector()
    hooks = ActivationStats(net, lambda n, m: n.endswith("ffn.w2"), on="input")   # FFN hidden units
    losses, evals, step_s = [], {}, []
    steps = data.shape[0]
    for step in range(1, steps + 1):
        x = data[step - 1].to(device)                                               # (B, T)
        factor = lr_cosine(step, 1.0, steps, warmup, 0.1)
        for opt in opts:
            scale_lr(opt, factor)
        _sync(device)
        t0 = time.perf_counter()
        with M.autocast(device):
            logits = net(x[:, :-1])                                                 # (B, T-1, K)
        loss = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].reshape(-1))
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = clip_grad_norm_(params, args.clip if args.clip > 0 else float("inf"))
        log_now = step % 50 == 0 or step == steps
        before = snapshot(net) if log_now else None
        for opt in opts:
            opt.step()
        _sync(device)
        step_s.append(time.perf_counter() - t0)
        cli.check_weights(f"{name} step {step}", net)                              # untimed
        losses.append(loss.item())
        spike = spikes.update(losses[-1])
        if step % args.eval_every == 0 or step == steps:
            evals[step] = evaluate(net, eval_data, device)
        if log_now or spike:
            ratio = max(update_ratios(before, net).values()) if before else float("nan")
            acts = list(hooks.stats.values())
            metrics = dict(loss=losses[-1], lr=opts[0].param_groups[0]["lr"], grad_norm=float(grad_norm),
                           max_update_ratio=ratio, ffn_act_std=sum(a["std"] for a in acts) / len(acts),
                           ffn_dead=max(a["dead"] for a in acts), spike=spike)
            if logger is not None:
                logger.log(step, echo=False, run=name, **metrics)
            if echo:
                print(f"  {name:>12} " + format_metrics(step, **metrics), flush=True)
    hooks.remove()
    return dict(losses=losses, evals=evals, step_s=step_s, spikes=spikes.n_spikes, final=evals[steps])


def steps_to(evals, target):
    """First evaluated step whose held-out loss is <= target (None if never)."""
    return next((step for step, loss in sorted(evals.items()) if loss <= target), None)


def time_optimizer_steps(cfg, names, lr_scale, weight_decay, device, rounds, reps=5):
    """Seconds per optimizer.step() for each recipe: the best of `rounds` rounds (timeit's rule:
    the minimum is the cost without interference), on one model with fixed random gradients,
    interleaving the recipes round by round so that machine noise hits all alike."""
    import model as M

    torch.manual_seed(0)
    net = M.GPT(cfg).to(device)
    for p in net.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opts = {name: RECIPES[name][1](net, RECIPES[name][0] * lr_scale, weight_decay) for name in names}
    saved = [p.detach().clone() for p in net.parameters()]
    times = {name: [] for name in names}
    for _ in range(rounds):
        for name in names:
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(reps):
                for opt in opts[name]:
                    opt.step()
            _sync(device)
            times[name].append((time.perf_counter() - t0) / reps)
            with torch.no_grad():
                for p, s in zip(net.parameters(), saved):
                    p.copy_(s)
    return {name: min(t) for name, t in times.items()}


def make_task(args, seed, n_batches):
    """The rule (fixed by --seed), `n_batches` training batches and the held-out set from `seed`."""
    rule = make_rule(args.symbols, torch.Generator().manual_seed(args.seed))
    gen = torch.Generator().manual_seed(seed + 1)
    data = sample_sequences(rule, n_batches * args.batch_size, args.seq_len, args.noise, gen)
    eval_data = sample_sequences(rule, args.eval_size, args.seq_len, args.noise, gen)
    return data.view(n_batches, args.batch_size, args.seq_len), eval_data          # (S, B, T), (E, T)


def optimizer_table(args, cfg, names, device, target, logger):
    """Train with every recipe on the same data from the same init and print the table."""
    data, eval_data = make_task(args, args.seed, args.steps)
    results = {}
    for name in names:
        lr = RECIPES[name][0] * args.lr_scale
        make = lambda net, name=name, lr=lr: RECIPES[name][1](net, lr, args.weight_decay)
        run = train(args, cfg, data, eval_data, make, device, args.warmup, name, logger, echo=name == "AdamW")
        run.update(lr=lr, steps_to_target=steps_to(run["evals"], target))
        results[name] = run
        print(f"  {name:>12} lr {lr:.0e}: held-out loss {run['final']:.3f} ({sum(run['step_s']):.1f}s)",
              flush=True)
    opt_times = time_optimizer_steps(cfg, names, args.lr_scale, args.weight_decay, device, args.timing_rounds)
    base_step = statistics.median(results[BASELINE]["step_s"])
    print(f"\n{args.steps} steps, batch {args.batch_size}x{args.seq_len}, warmup {args.warmup} + cosine, "
          f"clip {args.clip}; loss = held-out ({args.eval_size} sequences, every {args.eval_every} steps); "
          f"times relative to {BASELINE}(foreach=True), measured in this run")
    print(f"{'optimizer':<14}{'peak lr':>9}{'final loss':>12}{'steps to ' + format(target, '.2f'):>15}"
          f"{'train step':>12}{'opt.step':>10}{'opt.step ms':>13}")
    for name in names:
        run = results[name]
        run["opt_step_s"] = opt_times[name]
        reached = run["steps_to_target"]
        print(f"{name:<14}{run['lr']:>9.0e}{run['final']:>12.3f}{reached if reached else 'never':>15}"
              f"{statistics.median(run['step_s']) / base_step:>11.2f}x"
              f"{opt_times[name] / opt_times[BASELINE]:>9.2f}x{opt_times[name] * 1e3:>13.3f}")
    if "AdamW" in results:
        gap = max(abs(a - b) for a, b in zip(results["AdamW"]["losses"], results[BASELINE]["losses"]))
        print(f"optim.AdamW vs torch.optim.AdamW, same data and init: max |training loss difference| over "
              f"{args.steps} steps = {gap:.2e}")
    return results


def beta2_warmup_table(args, cfg, device, logger):
    """AdamW at a too-high lr, beta2 in {0.95, 0.999} x {no warmup, warmup}, averaged over seeds."""
    warm = max(1, args.beta_steps // 5)
    early_step = args.beta_steps // 3
    print(f"\nAdamW at a high peak lr {args.beta_lr:.0e}, no clipping, {args.beta_steps} steps, mean of "
          f"{args.beta_seeds} seeds [min, max]: v averages g^2 over ~1/(1-beta2) steps (20 vs 1000)")
    print(f"{'beta2':>7}{'warmup':>8}{'held-out @' + str(early_step):>21}{'final held-out':>21}{'spikes':>8}"
          f"{'cost of no warmup':>19}")
    no_clip = Args(**{**asdict(args), "clip": 0.0, "eval_every": early_step})
    table = {}
    tasks = [make_task(args, args.seed + s, args.beta_steps) for s in range(args.beta_seeds)]
    for beta2 in (0.95, 0.999):
        for warmup in (0, warm):
            runs = []
            for s, (data, eval_data) in enumerate(tasks):
                make = lambda net, b2=beta2: [AdamW(weight_decay_groups(net, args.weight_decay),
                                                    lr=args.beta_lr, betas=(0.9, b2))]
                runs.append(train(no_clip, cfg, data, eval_data, make, device, warmup,
                                  f"beta2={beta2} warmup={warmup} seed={args.seed + s}", logger,
                                  seed=args.seed + s))
            early = [r["evals"][early_step] for r in runs]
            final = [r["final"] for r in runs]
            row = dict(early=early, final=final, spikes=sum(r["spikes"] for r in runs))
            table[f"beta2={beta2},warmup={warmup}"] = row
            cost = ""
            if warmup:
                cold = table[f"beta2={beta2},warmup=0"]["final"]
                cost = f"{statistics.mean(cold) - statistics.mean(final):+.3f}"
            span = lambda v: f"{statistics.mean(v):.3f} [{min(v):.2f},{max(v):.2f}]"
            print(f"{beta2:>7}{warmup:>8}{span(early):>21}{span(final):>21}{row['spikes']:>8}{cost:>19}",
                  flush=True)
    return table


def demo_config(args):
    """The demo's GPT: K symbols, T positions, the --n-layer/--n-embd/--n-head given."""
    import model as M

    return M.Config(vocab_size=args.symbols, block_size=args.seq_len, n_layer=args.n_layer,
                    n_embd=args.n_embd, n_head=args.n_head, n_kv_head=args.n_head)


def check_args(args):
    """Every option, before anything is written: one UserError naming the first bad one."""
    import os

    from lib import cli

    try:
        select_recipes(args.optimizers)
    except ValueError as e:
        raise cli.UserError(str(e)) from None
    cli.require_at_least(args, 1, "steps", "batch_size", "n_layer", "n_embd", "n_head", "eval_every",
                         "eval_size", "beta_seeds", "timing_rounds")
    cli.require_at_least(args, 3, "seq_len")
    cli.require_at_least(args, 2, "symbols")
    cli.check_options(args, probability=("noise",), positive=("lr_scale", "beta_lr"),
                      non_negative=("warmup", "weight_decay", "clip", "target", "beta_steps", "threads"),
                      seed=("seed",))
    # a sweep factor around the tuned rates, kept far inside float32 (--lr-scale 1e308 overflowed inside torch)
    cli.require_at_most(args, MAX_LR_SCALE, "lr_scale")
    cli.require_at_most(args, cli.MAX_LR, "beta_lr")      # AdamW moves each weight by ~lr a step
    if 0 < args.beta_steps < 3:
        raise cli.UserError(f"--beta-steps must be 0 (skip) or >= 3, got {args.beta_steps}")
    try:
        demo_config(args)
    except ValueError as e:                              # e.g. n_embd not divisible by n_head
        raise cli.UserError(f"--n-embd {args.n_embd} --n-head {args.n_head}: {e}") from None
    if not args.out_dir or (os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir)):
        raise cli.UserError(f"--out-dir {args.out_dir!r}: must name a folder")
    cli.get_device(args.device)                           # auto | cpu | cuda[:N], and CUDA present


def main(argv=None):
    import json
    import os

    import model as M
    from lib import cli, rundir

    args = cli.parse_args(Args, argv)
    check_args(args)
    names = select_recipes(args.optimizers)
    if BASELINE not in names:
        names.append(BASELINE)
    device = cli.get_device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    cli.seed_everything(args.seed)
    floor = loss_floor(args.symbols, args.noise, args.seq_len)
    target = args.target if args.target > 0 else floor + 0.3
    cfg = demo_config(args)
    print(f"device {device} | GPT {M.GPT(cfg).num_params():,} params ({args.n_layer} layers, width "
          f"{args.n_embd}) | task: x_t = rule[x_t-2, x_t-1] w.p. {1 - args.noise:.2f}, K={args.symbols}, "
          f"T={args.seq_len} | loss at init ~ log K = {math.log(args.symbols):.3f}, "
          f"floor = {floor:.3f} nats, "
          f"target = {target:.3f}")
    os.makedirs(args.out_dir, exist_ok=True)
    rundir.save_args(args.out_dir, args)
    logger = rundir.MetricsLogger(args.out_dir, total=args.steps)
    try:
        results = optimizer_table(args, cfg, names, device, target, logger)
        beta = beta2_warmup_table(args, cfg, device, logger) if args.beta_steps > 0 else {}
    finally:
        logger.close()
    summary = {"floor": floor, "target": target, "beta2_warmup": beta,
               "optimizers": {n: {k: v for k, v in r.items() if k not in ("losses", "step_s")}
                              for n, r in results.items()}}
    with rundir.atomic_write(os.path.join(args.out_dir, "results.json")) as f:
        json.dump(summary, f, indent=2)
    print(f"\nwrote {args.out_dir}/results.json, metrics.jsonl, args.json")
    return summary


if __name__ == "__main__":
    from lib import cli

    cli.run(main)
