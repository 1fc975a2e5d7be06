"""What the round loop does for ``[privacy]``, in one place (:mod:`fedlora.privacy` has the
mechanisms and the accounting): sample the round (Poisson under client-level DP), refuse a round
that would pass ``max_epsilon``, release the noised mean under client-level DP, and keep the ε of
every row and of the summary. Both engines run it, as both run the loop."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from fedlora.runtime.federation import Federation, sample_clients
from fedlora.runtime.training import client_seed, steps_for
from fedlora.strategies import ClientUpdate, GlobalState


@dataclass
class RunPrivacy:
    """A run's privacy state: the σ in use and the accountant, replayed from the rows on resume."""

    fed: Federation
    accountant: Any  # fedlora.privacy.accounting.Accountant
    round_clip: float = 0.0  # the clip of the round being aggregated

    @classmethod
    def open(cls, fed: Federation, rows: list[dict[str, Any]]) -> RunPrivacy | None:
        """None without privacy; else the accountant after ``rows`` (the rounds already done)."""
        if fed.cfg.privacy.mode == "none":
            return None
        from fedlora.privacy import make_accountant

        me = cls(fed, make_accountant(fed.cfg, fed.dp_sigma, [len(t) for t in fed.client_train]))
        if fed.cfg.privacy.adaptive_clip and 0 < fed.dp_sigma and 2 * me.count_sigma <= fed.dp_sigma:
            from fedlora.errors import ConfigError

            raise ConfigError(f"privacy.adaptive_clip: the count noise σ_b = {me.count_sigma:.4g} must exceed σ/2 = "
                              f"{fed.dp_sigma / 2:.4g}, or no noise would be left for the update; raise "
                              "privacy.count_noise (or use more clients per round)")
        for row in rows:
            me.accountant.record(me.steps(row["clients"]))
        return me

    @property
    def client_level(self) -> bool:
        return self.fed.cfg.privacy.mode == "client"

    def steps(self, clients: list[int]) -> dict[int, int]:
        """Each client's local steps in a round it is sampled in (every sampled client is charged,
        failed or not)."""
        return {k: steps_for(len(self.fed.client_train[k]), self.fed.cfg.train) for k in clients}

    def sample(self, t: int) -> list[int]:
        cfg = self.fed.cfg
        return sample_clients(cfg.run.seed, t, self.fed.num_clients, cfg.train, poisson=self.client_level)

    def over_budget(self, sampled: list[int]) -> str | None:
        """Why the next round may not run (it would take ε above ``max_epsilon``), or None."""
        limit = self.fed.cfg.privacy.max_epsilon
        if not limit:
            return None
        after = self.accountant.epsilon_after(self.steps(sampled))
        if after <= limit:
            return None
        return (f"privacy budget: round {self.accountant.rounds + 1} would take epsilon from "
                f"{self.accountant.epsilon():.4g} to {after:.4g}, above privacy.max_epsilon = {limit:g}")

    def record(self, sampled: list[int], state: GlobalState) -> dict[str, Any]:
        """One round done; the ``privacy`` block of its metrics row (with adaptive clipping, the clip
        the round used and the one the next will use)."""
        self.accountant.record(self.steps(sampled))
        block = self.accountant.block()
        if self.fed.cfg.privacy.adaptive_clip:
            block.update(clip=self.round_clip, next_clip=current_clip(self.fed.cfg, state))
        return block

    def noised_update(self, state: GlobalState, updates: list[ClientUpdate]) -> ClientUpdate:
        """Client-level DP: the one update the strategy aggregates, the noised mean of the clipped
        updates over the fixed denominator (the expected clients per round), noise keyed by (seed,
        round) so that both engines release the same model."""
        from fedlora.privacy.clipping import noised_mean

        cfg, fed = self.fed.cfg, self.fed
        self.round_clip = current_clip(cfg, state)
        parts = fed.strategy.upload_parts(state.round)
        generator = torch.Generator().manual_seed(client_seed(cfg.run.seed, state.round, "server", "dp-noise"))
        mean = noised_mean([u.adapter for u in updates], state.adapter, parts, clip=self.round_clip,
                           sigma=self.update_sigma, denominator=self.denominator, generator=generator)
        scaling = updates[0].scaling if updates else state.scaling
        return ClientUpdate("dp-mean", mean, 1, scaling, {})

    @property
    def denominator(self) -> float:
        from fedlora.runtime.federation import clients_per_round

        return float(clients_per_round(self.fed.num_clients, self.fed.cfg.train))

    @property
    def count_sigma(self) -> float:
        """σ_b of adaptive clipping (the paper's default: expected clients per round / 20)."""
        return self.fed.cfg.privacy.count_noise or self.denominator / 20

    @property
    def update_sigma(self) -> float:
        """The noise multiplier of the update: σ, or with adaptive clipping σ_Δ = (σ⁻² − (2σ_b)⁻²)^(−½)."""
        sigma = self.fed.dp_sigma
        if not self.fed.cfg.privacy.adaptive_clip or sigma == 0:
            return sigma
        return (sigma ** -2 - (2 * self.count_sigma) ** -2) ** -0.5

    def next_clip(self, state: GlobalState, new: GlobalState, updates: list[ClientUpdate]) -> None:
        """Adaptive clipping: ``new.info["dp_clip"]`` = C·exp(−η_C·(b̃ − γ)), b̃ the noised fraction of
        this round's clients whose update norm was within C (noise keyed by seed and round)."""
        p = self.fed.cfg.privacy
        if not p.adaptive_clip:
            return
        clip = self.round_clip  # set by noised_update for this round
        within = sum(1.0 for u in updates if float(u.info.get("update_norm", math.inf)) <= clip)
        g = torch.Generator().manual_seed(client_seed(self.fed.cfg.run.seed, state.round, "server", "dp-count"))
        noised = (within + float(torch.randn((), generator=g, dtype=torch.float64)) * self.count_sigma) / self.denominator
        new.info = dict(new.info, dp_clip=clip * math.exp(-p.clip_lr * (noised - p.clip_quantile)))

    def summary(self) -> dict[str, Any]:
        from fedlora.privacy import summary_block

        return summary_block(self.fed.cfg, self.accountant, num_clients=self.fed.num_clients)

    def describe(self) -> str:
        """The line a run prints when it starts."""
        p = self.fed.cfg.privacy
        sigma = self.fed.dp_sigma
        how = f"calibrated to epsilon {p.target_epsilon:g} after {self.fed.cfg.train.rounds} rounds" \
            if p.target_epsilon else "configured"
        line = f"privacy: {p.mode}-level DP, noise multiplier {sigma:.4g} ({how}), clip {p.clip:g}, delta {p.delta:g}"
        if sigma == 0:
            line += "; [bold red]noise 0: no privacy (epsilon = inf)[/]"
        if p.adaptive_clip:
            line += (f"; adaptive clip (quantile {p.clip_quantile:g}, lr {p.clip_lr:g}, count noise "
                     f"{self.count_sigma:.3g}; update noise {self.update_sigma:.4g})")
        return line


def current_clip(cfg, state: GlobalState) -> float:
    """The clip of this round: ``privacy.clip``, or with adaptive clipping the one the last round set."""
    return float(state.info.get("dp_clip", cfg.privacy.clip)) if cfg.privacy.adaptive_clip else cfg.privacy.clip


def upload_weighting(cfg, strategy) -> str:
    """How a client weighs its SecAgg+ payload: by sample count (``"samples"``) or 1 (``"uniform"``:
    the strategy's weighting, or client-level DP, where every client weighs the same and the server
    turns the revealed mean into the noised sum). The server's ``max_weight`` must be the total of
    these weights: SecAgg+ scales each payload by weight / max_weight before quantising, so a total
    far above the real one (the sample count with weights of 1) loses the payload to the
    quantisation step."""
    return "uniform" if cfg.privacy.mode == "client" else strategy.weighting
