"""CoA-LoRA's configuration-aware mapper (arXiv 2509.25214, §3.2).

Per target layer l the inputs are the fields of its configuration c_l (the five NF fields, or the
GGUF type in a GGUF space, docs/gguf.md), its block index and its module type. Each is embedded (width ``emb_dim``), concatenated, then
LayerNorm -> Linear -> SiLU -> Linear(r*r) gives U_l, and the adapter uses
``M_l = I + gamma * U_l``:  ΔW_l = s · B_l M_l A_l. The last Linear starts near zero (std 1e-3,
bias 0), so training starts from plain LoRA. All layers are computed in one batched call.
"""

from __future__ import annotations

import torch
from torch import nn

#: order of the index columns fed to the mapper in the NF space (a GGUF space: gguf, position, module)
FIELDS = ("bits", "bits0", "dtype1", "block0", "block1", "position", "module")
STATIC = ("position", "module")


class ConfigMapper(nn.Module):
    def __init__(
        self,
        field_sizes: dict[str, int],
        rank: int,
        emb_dim: int = 8,
        hidden: int = 128,
        init_std: float = 1e-3,
        gamma_init: float = 1.0,
    ) -> None:
        super().__init__()
        # the columns, in the order given: the space's fields, then position and module
        self.fields = tuple(field_sizes)
        missing = [f for f in STATIC if f not in field_sizes]
        if missing or self.fields[-2:] != STATIC or len(self.fields) < 3:
            raise ValueError(
                f"ConfigMapper needs sizes for the configuration fields, then {list(STATIC)}; "
                f"got {list(self.fields)}"
            )
        self.rank = rank
        self.embeddings = nn.ModuleList(nn.Embedding(field_sizes[f], emb_dim) for f in self.fields)
        d = emb_dim * len(self.fields)
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, hidden)
        self.act = nn.SiLU()
        self.fc2 = nn.Linear(hidden, rank * rank)
        nn.init.normal_(self.fc2.weight, std=init_std)
        nn.init.zeros_(self.fc2.bias)
        self.gamma = nn.Parameter(torch.tensor(float(gamma_init)))
        self.register_buffer("eye", torch.eye(rank), persistent=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """``idx`` (L, F) long (columns in ``self.fields`` order) -> mixing matrices M (L, r, r)."""
        z = torch.cat([emb(idx[:, i]) for i, emb in enumerate(self.embeddings)], dim=-1)  # (L, F*e)
        u = self.fc2(self.act(self.fc1(self.norm(z))))  # (L, r*r)
        return self.eye + self.gamma * u.view(-1, self.rank, self.rank)  # (L, r, r)
