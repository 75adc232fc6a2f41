"""GPTConfig: nanoGPT's model settings plus the MLA and SVD settings, checked at construction."""
import warnings
from dataclasses import dataclass, fields
from typing import Optional, Union, get_args, get_origin

ATTN_BACKENDS = ("auto", "triton", "sdpa", "cudnn", "flash", "reference")
MLA_PATHS = ("auto", "absorbed", "expanded", "materialized")
GELU_APPROXIMATIONS = ("none", "tanh")
SVD_MODES = ("weight", "activation")


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # bias in Linears and LayerNorms, as GPT-2; False is a bit better and faster
    gelu_approximate: str = "none"  # the MLP's GELU: 'none' (erf, nanoGPT) or 'tanh' (GPT-2's own weights)

    # Multi-Head Latent Attention (docs/design.md, section 2)
    use_mla: bool = False
    mla_latent_dim: Optional[int] = None  # latent width r; None -> head_size // 2
    mla_kv_groups: Optional[int] = None  # latent groups g; None -> n_head (one latent per head)
    mla_joint_kv: bool = False  # one latent serves K and V (DeepSeek-V2 style)

    # SVD compression of the values (MLA's value latents, or standard attention's values)
    use_svd: bool = False
    svd_rank: Optional[int] = None  # None -> full rank (MLA's latent dim in 'weight' mode, else the head size)
    svd_mode: str = "weight"  # 'weight': causal and cached; 'activation': per-sequence, not causal

    # 'auto': MLA's core per shape from the GPU's measured table (mla_gpt.model.plan), standard
    # attention on SDPA; 'triton' (ours), 'sdpa' (PyTorch picks), 'cudnn' or 'flash' (SDPA forced to
    # one), 'reference' for the tests. On a CPU 'auto' is SDPA.
    attn_backend: str = "auto"
    mla_path: str = "auto"  # MLA's form: 'auto' (mla_gpt.model.plan), 'absorbed', 'expanded', 'materialized'

    def __post_init__(self):
        for f in fields(self):
            _check_type(f.name, getattr(self, f.name), f.type)
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"n_embd must be divisible by n_head, got n_embd={self.n_embd}, n_head={self.n_head}"
            )
        for name, value, allowed in (
            ("attn_backend", self.attn_backend, ATTN_BACKENDS),
            ("mla_path", self.mla_path, MLA_PATHS),
            ("svd_mode", self.svd_mode, SVD_MODES),
            ("gelu_approximate", self.gelu_approximate, GELU_APPROXIMATIONS),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if self.mla_latent_dim is not None and self.mla_latent_dim < 1:
            raise ValueError(f"mla_latent_dim must be >= 1 or None, got {self.mla_latent_dim}")
        if self.mla_kv_groups is not None and (
            self.mla_kv_groups < 1 or self.n_head % self.mla_kv_groups != 0
        ):
            raise ValueError(
                f"mla_kv_groups must divide n_head={self.n_head}, got {self.mla_kv_groups}"
            )
        if self.use_svd and self.svd_rank is not None:
            # the values SVD cuts: MLA's value latents (weight) or expanded values; standard attention's values
            latent = self.use_mla and self.svd_mode == "weight"
            limit = self.latent_dim if latent else self.head_size
            what = "latent dim" if latent else "head size"
            if not 1 <= self.svd_rank <= limit:
                raise ValueError(
                    f"svd_rank must be in [1, {limit}] (the {what} in svd_mode={self.svd_mode!r}), "
                    f"got {self.svd_rank}"
                )

        for message in self.inactive_settings():
            warnings.warn(message, UserWarning, stacklevel=3)

    def inactive_settings(self):
        """Messages for keys set to a non-default value that mean nothing without another key."""
        defaults = {f.name: f.default for f in fields(self)}
        needs = {"svd_rank": "use_svd", "svd_mode": "use_svd", "mla_latent_dim": "use_mla",
                 "mla_kv_groups": "use_mla", "mla_joint_kv": "use_mla", "mla_path": "use_mla"}
        return [f"{key}={getattr(self, key)!r} has no effect without {switch}=True"
                for key, switch in needs.items()
                if getattr(self, key) != defaults[key] and not getattr(self, switch)]

    @property
    def head_size(self):
        return self.n_embd // self.n_head

    @property
    def latent_dim(self):
        return self.mla_latent_dim if self.mla_latent_dim is not None else max(1, self.head_size // 2)

    @property
    def kv_groups(self):
        return self.mla_kv_groups if self.mla_kv_groups is not None else self.n_head


def annotation_options(annotation):
    """The types an annotation admits: (int, NoneType) for Optional[int], (str,) for str."""
    return get_args(annotation) if get_origin(annotation) is Union else (annotation,)


def type_name(annotation):
    """'int', 'int or None', ... for messages."""
    return " or ".join("None" if t is type(None) else t.__name__ for t in annotation_options(annotation))


def coerce(value, annotation):
    """value if it fits annotation (an int where a float is asked becomes a float), else TypeError."""
    for typ in annotation_options(annotation):
        if typ is type(None) and value is None:
            return value
        if typ is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if typ is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if typ in (bool, str) and isinstance(value, typ):
            return value
    raise TypeError(f"expects {type_name(annotation)}, got {value!r} ({type(value).__name__})")


def _check_type(name, value, annotation):
    try:
        coerce(value, annotation)
    except TypeError:
        raise TypeError(
            f"{name} must be {type_name(annotation)}, got {value!r} ({type(value).__name__})"
        ) from None
