"""Pure-PyTorch DMIL model written from the published semantics (DESIGN section 1) of the current
official revision: the test oracle of :class:`dmil_fast.nn.DMILModel`.

Plain torch operations only, module by module as the method is described: every Gaussian head
is evaluated on its own, every KL is the unweighted mean of the elementwise diagonal-Gaussian KL
(as the official model returns it; the objective weights it), every sample draws
``torch.randn_like`` in the official order. That order: stage 1 samples (m1 tr, m1 ir, m2 tr,
m2 ir); stage 2 reads the tr means and samples (m1 ir, m2 ir); stage 3 samples (m1 tr, m2 tr,
m1 ir, m2 ir); then the second level samples the redundancy, unique-1 and unique-2 latents and
makes one discarded draw for each of the two alignment KLs. Submodule and parameter names are
those of the official model, so state_dicts move between this model, the official one and
``dmil_fast.nn.DMILModel`` with ``strict=True``. Nothing here is written for speed.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor


class GaussianHead(nn.Module):
    """Linear(input_size -> 2 * embed_size); the first half is the mean, the second the log-variance."""

    def __init__(self, input_size: int, embed_size: int):
        super().__init__()
        self.embed_size = embed_size
        self.fc = nn.Linear(input_size, 2 * embed_size)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        out = self.fc(x)
        return out[:, : self.embed_size], out[:, self.embed_size:]


class SynergyFusion(nn.Module):
    def __init__(self, embed_size: int):
        super().__init__()
        self.fc_out = nn.Linear(3 * embed_size, embed_size)

    def forward(self, x1: Tensor, x2: Tensor) -> Tensor:
        return self.fc_out(torch.cat((x1, x2, x1 * x2), dim=1))


def gaussian_kl(q_mean: Tensor, q_log_var: Tensor, p_mean=0.0, p_log_var=0.0) -> Tensor:
    """0.5 * mean(-d + e^d + (q_mean - p_mean)^2 e^{-p_log_var} - 1), d = q_log_var - p_log_var."""
    p_mean = torch.as_tensor(p_mean, dtype=q_mean.dtype, device=q_mean.device)
    p_log_var = torch.as_tensor(p_log_var, dtype=q_log_var.dtype, device=q_log_var.device)
    d = q_log_var - p_log_var
    return 0.5 * torch.mean(-d + torch.exp(d) + (q_mean - p_mean).pow(2) * torch.exp(-p_log_var) - 1)


def reconstruction_error(x: Tensor, x_hat: Tensor) -> Tensor:
    """||x - x_hat||_F^2 / (B * E), shape (1,)."""
    return (torch.norm(x - x_hat) ** 2 / (x.size(0) * x.size(1))).unsqueeze(0)


def average_pool(x: Tensor, batch_size: int) -> Tensor:
    """(B, D) unchanged; (B*T, C, H, W) -> mean over (T, H, W) per sample -> (B, C)."""
    if x.dim() == 2:
        return x
    _, c, h, w = x.shape
    x = x.view(batch_size, -1, c, h, w).permute(0, 2, 1, 3, 4)
    return torch.flatten(F.adaptive_avg_pool3d(x, 1), 1)


def _mlp(embed_size: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(2 * embed_size, embed_size // 2), nn.ReLU(), nn.Linear(embed_size // 2, embed_size))


class ReferenceDMILModel(nn.Module):
    """Reference DMIL: same constructor, names, stages and output keys as the official model.

    ``video_model``/``audio_model`` ``None`` mean identity encoders. ``configure_stage`` freezes
    (requires_grad False, eval mode) the stage-1 modules in stage 2, as the official code does;
    ``train()`` is plain ``nn.Module.train``.
    """

    def __init__(self, video_model, audio_model, embed_size=512, num_class=101, method=None, stage=1,
                 input_size=512):
        super().__init__()
        E = embed_size
        self.audio_net = audio_model if audio_model is not None else nn.Identity()
        self.visual_net = video_model if video_model is not None else nn.Identity()
        self.embed_size = E
        self.stage = stage
        self.embed_v = nn.Linear(input_size, E)
        self.embed_a = nn.Linear(input_size, E)
        self.IB_m1_tr = GaussianHead(E, E)
        self.IB_m1_ir = GaussianHead(E, E)
        self.IB_m2_tr = GaussianHead(E, E)
        self.IB_m2_ir = GaussianHead(E, E)
        self.IB_redundancy = GaussianHead(2 * E, E)
        self.IB_m1_r = GaussianHead(E, E)
        self.IB_m2_r = GaussianHead(E, E)
        self.IB_m1_unique = GaussianHead(E, E)
        self.IB_m2_unique = GaussianHead(E, E)
        self.cross_modality = SynergyFusion(E)
        self.recon_1 = _mlp(E)
        self.recon_2 = _mlp(E)
        self.recon_tr_1 = _mlp(E)
        self.recon_tr_2 = _mlp(E)
        self.tr1_fc = nn.Linear(E, num_class)
        self.tr2_fc = nn.Linear(E, num_class)
        self.red_fc = nn.Linear(E, num_class)
        self.unique1_fc = nn.Linear(E, num_class)
        self.unique2_fc = nn.Linear(E, num_class)
        self.synergy_fc = nn.Linear(E, num_class)
        self.gating_network = nn.Sequential(nn.Linear(4 * E, E), nn.ReLU(), nn.Linear(E, 4), nn.Softmax(dim=1))

    def configure_stage(self, stage: int) -> None:
        if stage not in (1, 2, 3):
            raise ValueError(f"stage must be 1, 2 or 3, got {stage!r}")
        self.stage = stage
        frozen = [self.visual_net, self.audio_net, self.embed_v, self.embed_a, self.IB_m1_tr, self.IB_m1_ir,
                  self.IB_m2_tr, self.IB_m2_ir, self.recon_1, self.recon_2, self.tr1_fc, self.tr2_fc]
        for module in frozen:
            for p in module.parameters():
                p.requires_grad_(stage != 2)
            if stage == 2:
                module.eval()

    def latent(self, mean: Tensor, log_var: Tensor, p_mean=0.0, p_log_var=0.0) -> Tuple[Tensor, Tensor]:
        """(sample in training mode, else the mean) and the unweighted KL(q || p) as a (1,) tensor."""
        kl = gaussian_kl(mean, log_var, p_mean, p_log_var).unsqueeze(0)
        if self.training:
            return mean + torch.exp(log_var / 2) * torch.randn_like(mean), kl
        return mean, kl

    def forward(self, visual, audio, train_modality="both") -> Dict[str, object]:
        b = visual.size(0)
        v = self.embed_v(average_pool(self.visual_net(visual), b))
        a = self.embed_a(average_pool(self.audio_net(audio), b))
        if self.stage == 1:
            return self._intra(v, a, train_modality)
        if self.stage == 2:
            return self._consistency(v, a)
        return self._joint(v, a)

    def _one_modality(self, x, tr_head, ir_head, decoder, classifier):
        tr_mean, tr_log_var = tr_head(x)
        ir_mean, ir_log_var = ir_head(x)
        z_tr, kl_tr = self.latent(tr_mean, tr_log_var)
        z_ir, kl_ir = self.latent(ir_mean, ir_log_var)
        x_hat = decoder(torch.cat((z_tr, z_ir), dim=1))
        return classifier(z_tr), kl_tr + kl_ir, reconstruction_error(x, x_hat)

    def _intra(self, v, a, train_modality):
        zero = v.new_zeros(1)
        if train_modality == "visual":
            o, kl, rec = self._one_modality(v, self.IB_m1_tr, self.IB_m1_ir, self.recon_1, self.tr1_fc)
            return {"v_out": o, "a_out": o, "out": o, "loss_IB": (kl, zero), "loss_rec_input": (rec, zero)}
        if train_modality == "audio":
            o, kl, rec = self._one_modality(a, self.IB_m2_tr, self.IB_m2_ir, self.recon_2, self.tr2_fc)
            return {"v_out": o, "a_out": o, "out": o, "loss_IB": (zero, kl), "loss_rec_input": (zero, rec)}
        vo, kl_v, rec_v = self._one_modality(v, self.IB_m1_tr, self.IB_m1_ir, self.recon_1, self.tr1_fc)
        ao, kl_a, rec_a = self._one_modality(a, self.IB_m2_tr, self.IB_m2_ir, self.recon_2, self.tr2_fc)
        return {"v_out": vo, "a_out": ao, "out": (vo + ao) / 2, "loss_IB": (kl_v, kl_a),
                "loss_rec_input": (rec_v, rec_a)}

    def _first_level_all(self, v, a):
        p = {"tr1": self.IB_m1_tr(v), "tr2": self.IB_m2_tr(a), "ir1": self.IB_m1_ir(v), "ir2": self.IB_m2_ir(a)}
        z, kl = {}, {}
        for name in ("tr1", "tr2", "ir1", "ir2"):
            z[name], kl[name] = self.latent(*p[name])
        return p, z, kl

    def _consistency(self, v, a):
        with torch.no_grad():  # frozen first level: tr means only, ir samples
            tr1_mean, _ = self.IB_m1_tr(v)
            tr2_mean, _ = self.IB_m2_tr(a)
            ir1, _ = self.latent(*self.IB_m1_ir(v))
            ir2, _ = self.latent(*self.IB_m2_ir(a))
        out = self._decompose(tr1_mean, tr2_mean, ir1, ir2)
        out["v_out"] = self.tr1_fc(tr1_mean)
        out["a_out"] = self.tr2_fc(tr2_mean)
        return out

    def _joint(self, v, a):
        p, z, kl = self._first_level_all(v, a)
        v_hat = self.recon_1(torch.cat((z["tr1"], z["ir1"]), dim=1))
        a_hat = self.recon_2(torch.cat((z["tr2"], z["ir2"]), dim=1))
        out = self._decompose(p["tr1"][0], p["tr2"][0], z["ir1"], z["ir2"])
        out["v_out"] = self.tr1_fc(z["tr1"])
        out["a_out"] = self.tr2_fc(z["tr2"])
        out["loss_IB"] = (kl["tr1"] + kl["ir1"], kl["tr2"] + kl["ir2"])
        out["loss_rec_input"] = (reconstruction_error(v, v_hat), reconstruction_error(a, a_hat))
        return out

    def _decompose(self, m1, m2, s1, s2):
        red_mean, red_log_var = self.IB_redundancy(torch.cat((m1, m2), dim=1))
        r, kl_red = self.latent(red_mean, red_log_var)
        u1_mean, u1_log_var = self.IB_m1_unique(m1)
        u2_mean, u2_log_var = self.IB_m2_unique(m2)
        u1, kl_u1 = self.latent(u1_mean, u1_log_var)
        u2, kl_u2 = self.latent(u2_mean, u2_log_var)
        r1_mean, r1_log_var = self.IB_m1_r(m1)
        r2_mean, r2_log_var = self.IB_m2_r(m2)
        _, align_1 = self.latent(red_mean, red_log_var, r1_mean, r1_log_var)
        _, align_2 = self.latent(red_mean, red_log_var, r2_mean, r2_log_var)
        m1_hat = self.recon_tr_1(torch.cat((r, u1), dim=1))
        m2_hat = self.recon_tr_2(torch.cat((r, u2), dim=1))
        s = self.cross_modality(s1, s2)
        logits_r, logits_u1, logits_u2, logits_s = self.red_fc(r), self.unique1_fc(u1), self.unique2_fc(u2), self.synergy_fc(s)
        g = self.gating_network(torch.cat((u1, u2, r, s), dim=1))
        fused = g[:, 0:1] * logits_u1 + g[:, 1:2] * logits_u2 + g[:, 2:3] * logits_r + g[:, 3:4] * logits_s
        return {"out": fused, "out_synergy": logits_s, "out_red": logits_r, "out_unique": (logits_u1, logits_u2),
                "loss_inter": (align_1, align_2),
                "loss_rec_tr": (reconstruction_error(m1, m1_hat), reconstruction_error(m2, m2_hat)),
                "loss_uni": (kl_u1, kl_u2), "loss_red": kl_red, "gate_weights": g}
