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

The optimizers, schedules and diagnostics need only torch; model.py is used by the demo alone.
"""
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
            state["step"] = state.get("step", 0) + 1
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
    X = G.float()                                                   # (..., m, n)
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
# Parameter groups: decay the matrices, not the norms, biases and embeddings
# ----------------------------------------------------------------------------------------------

def _no_decay_ids(model):
    """ids of parameters that must not be decayed: embedding tables and norm gains/biases."""
    ids = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding) or "norm" in type(module).__name__.lower():
            ids.update(id(p) for p in module.parameters(recurse=False))
    return ids


def weight_decay_groups(model, weight_decay=0.1):
    """Two param groups: {matrices, weight_decay} and {the rest, 0.0}, each with its "names".

    Decay shrinks weights towards 0, which is a prior on matrices (it limits their norm), but is
    harmful on a norm's gain (pulls it to 0), a bias (an offset with no scale symmetry) and an
    embedding row (rare tokens would decay away between their updates). Rule: decay a tensor
    iff it has >= 2 dims and is neither an nn.Embedding table nor held by a module whose class
    name contains "Norm". A tied embedding/output matrix is an embedding, so it is not decayed.
    Parameters shared between modules appear once (named_parameters de-duplicates).
    """
    no_decay = _no_decay_ids(model)
    decay, rest = ([], []), ([], [])
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        bucket = decay if (p.ndim >= 2 and id(p) not in no_decay) else rest
        bucket[0].append(name)
        bucket[1].append(p)
    return [{"params": decay[1], "names": decay[0], "weight_decay": weight_decay},
            {"params": rest[1], "names": rest[0], "weight_decay": 0.0}]


def muon_param_split(model):
    """(hidden 2-D matrices for Muon, everything else for AdamW): embeddings, norms, biases and
    the output head (any parameter named "lm_head...") stay with AdamW, as in the Muon reference."""
    skip = _no_decay_ids(model)
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
    """lr(t) = lr * t / W for t < W (linear warmup from min_lr), then lr."""
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
        D = T - decay_frac * T
    """
    if step < warmup_steps:
        return _warmup(step, lr, warmup_steps, min_lr)
    decay_start = max(warmup_steps, total_steps - int(round(decay_frac * total_steps)))
    if step < decay_start:
        return lr
    progress = min(1.0, (step - decay_start) / max(1, total_steps - decay_start))
    return lr - (lr - min_lr) * progress


SCHEDULES = {"constant": lr_constant, "cosine": lr_cosine, "linear": lr_linear, "wsd": lr_wsd}


def set_lr(optimizer, lr):
    """Write lr into every param group (times the group's optional "lr_scale")."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


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
            per_layer[layer] = per_layer.get(layer, 0.0) + p.grad.detach().float().pow(2).sum().item()
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
            old = before[name].float()
            delta_sq[layer] = delta_sq.get(layer, 0.0) + (p.detach().float() - old).pow(2).sum().item()
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
    x = x.detach().float()
    units = x.reshape(-1, x.shape[-1])                                   # (N, C)
    dead = (units.abs() <= dead_eps).all(dim=0).float().mean()
    return {"mean": x.mean().item(), "std": x.std(unbiased=False).item(),
            "dead": dead.item(), "saturated": (x.abs() >= saturation).float().mean().item()}


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
            text = f"{value:.2e}" if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5) else f"{value:.4f}"
            parts.append(f"{key} {text}")
        else:
            parts.append(f"{key} {value}")
    return " | ".join(parts)
