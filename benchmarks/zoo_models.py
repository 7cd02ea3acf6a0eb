"""The models of the zoo sweep (``benchmarks/zoo.py``): timm, torchvision and Hugging Face transformers.

Every model is built with random weights (nothing is downloaded) in eval mode, with random BatchNorm
statistics and affines so that folding is exercised with non-trivial values. A model is named by a
:class:`Spec` (``source``, ``name``) that a worker process can rebuild on its own, so the sweep can run
each model in a fresh process with a timeout.

- timm: one model per family, a family being the module that registers the model
  (``timm.list_modules()``), and the smallest real variant of it (``test_*`` models excluded).
  Parameter counts are measured on the meta device; doing so for all ~1,400 timm models takes ~7 CPU
  minutes, so the result is stored in :data:`TIMM_FAMILIES` (regenerate it with
  ``python -m benchmarks.zoo_models --derive-timm``). Modules a newer timm adds are derived at run time.
- torchvision: every classification model, segmentation, video, and detection backbones with an FPN.
- Hugging Face: tiny configs (hidden 64, 2 layers, 4 heads, vocab 128, eager attention, no KV cache).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

MAX_PARAMS = 60_000_000  # larger models are skipped (reason recorded)


@dataclass(frozen=True)
class Spec:
    source: str  # timm | torchvision | hf
    name: str  # the model name within its source (an HF zoo id for hf)
    family: str
    params: int | None = None  # known parameter count (timm meta count), for skipping big ones early


@dataclass
class Built:
    model: nn.Module
    make_inputs: Callable[[int], tuple]  # seed -> positional inputs
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra forward kwargs for our own runs
    note: str = ""


# ---------------------------------------------------------------- shared helpers
def randomize_norm_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BatchNorm (also FrozenBatchNorm2d) running stats and affines; eval mode."""
    gen = torch.Generator().manual_seed(seed)

    def fill(t: torch.Tensor | None, lo: float, hi: float) -> None:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
            t.copy_(torch.rand(t.shape, generator=gen) * (hi - lo) + lo)

    with torch.no_grad():
        for m in model.modules():
            kind = type(m).__name__
            if isinstance(m, nn.modules.batchnorm._NormBase) or kind in ("FrozenBatchNorm2d", "BatchNormAct2d"):
                fill(getattr(m, "weight", None), 0.5, 1.5)
                fill(getattr(m, "bias", None), -0.2, 0.2)
                fill(getattr(m, "running_mean", None), -0.1, 0.1)
                fill(getattr(m, "running_var", None), 0.5, 1.5)
    return model.eval()


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _images(shape: tuple[int, ...]) -> Callable[[int], tuple]:
    return lambda seed: (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)),)


def _forward_ok(model: nn.Module, inputs: tuple) -> str | None:
    try:
        with torch.no_grad():
            model(*inputs)
        return None
    except Exception as exc:  # a size the model does not accept
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]


class SkipModel(Exception):
    """The model is not run (too big, cannot be built): the message is the reason."""


# ---------------------------------------------------------------- timm
# module -> (smallest non-test model, parameters); timm 1.0.31, derived by derive_timm_families().
TIMM_FAMILIES: dict[str, tuple[str, int]] = {
    "beit": ("beit_base_patch16_224", 86530984),
    "byoanet": ("halonet_h1", 8100056),
    "byobnet": ("mobileone_s1", 4825192),
    "cait": ("cait_xxs24_224", 11956264),
    "coat": ("coat_tiny", 5498540),
    "convit": ("convit_tiny", 5710512),
    "convmixer": ("convmixer_768_32", 21110248),
    "convnext": ("convnext_zepto_rms", 2155656),
    "cpubone": ("cpubone_nano", 6519700),
    "crossvit": ("crossvit_tiny_240", 7014800),
    "csatv2": ("csatv2", 11103444),
    "cspnet": ("cs3darknet_focus_s", 3274728),
    "cspnext": ("cspnext_tiny", 2733700),
    "davit": ("davit_tiny", 28360168),
    "deepseek_vit": ("deepseek_vit_412m", 411842560),
    "deit": ("deit_tiny_patch16_224", 5717416),
    "densenet": ("densenet121", 7978856),
    "dla": ("dla46x_c", 1068440),
    "dpn": ("dpn48b", 9126226),
    "edgenext": ("edgenext_xx_small", 1327216),
    "efficientformer": ("efficientformer_l1", 12289928),
    "efficientformer_v2": ("efficientformerv2_s0", 3600256),
    "efficientnet": ("mobilenetv2_035", 1677128),
    "efficientvim": ("efficientvim_m1", 6679458),
    "efficientvit_mit": ("efficientvit_b0", 3410008),
    "efficientvit_msra": ("efficientvit_m0", 2349436),
    "eva": ("vit_tiny_patch16_dinov3_qkvb", 5489664),
    "fasternet": ("fasternet_t0", 3905500),
    "fastvit": ("fastvit_t8", 4026232),
    "focalnet": ("focalnet_tiny_srf", 28427116),
    "gcvit": ("gcvit_xxtiny", 11995428),
    "gemma4_vit": ("gemma4_vit_167m", 167364608),
    "ghostnet": ("ghostnet_050", 2587292),
    "hardcorenas": ("hardcorenas_b", 5176544),
    "hgnet": ("hgnetv2_b0", 5996550),
    "hiera": ("hiera_tiny_224", 27910216),
    "hieradet_sam2": ("sam2_hiera_tiny", 26851008),
    "hrnet": ("hrnet_w18_small", 13187464),
    "iformer": ("iformer_t", 2886456),
    "inception_next": ("inception_next_atto", 4156520),
    "inception_resnet_v2": ("inception_resnet_v2", 55843464),
    "inception_v3": ("inception_v3", 23834568),
    "inception_v4": ("inception_v4", 42679816),
    "lcnetv2": ("lcnetv2_small", 4128552),
    "levit": ("levit_128s", 7777058),
    "lowformer": ("lowformer_b0", 14100472),
    "mambaout": ("mambaout_femto", 7304536),
    "maxxvit": ("maxvit_pico_rw_256", 7457996),
    "metaformer": ("poolformerv2_s12", 11891712),
    "mlp_mixer": ("gmlp_ti16_224", 5867328),
    "mobilenetv3": ("mobilenetv3_small_050", 1593224),
    "mobilenetv5": ("mobilenetv5_base", 82647976),
    "mobilevit": ("mobilevit_xxs", 1272024),
    "mvitv2": ("mvitv2_tiny", 24173320),
    "naflexvit": ("naflexvit_base_patch16_parfac_gap", 86461672),
    "nasnet": ("nasnetalarge", 88753150),
    "nest": ("nest_tiny", 17057608),
    "nextvit": ("nextvit_small", 31763368),
    "nfnet": ("nf_regnet_b0", 8764288),
    "pit": ("pit_ti_224", 4847272),
    "pnasnet": ("pnasnet5large", 86057668),
    "pvt_v2": ("pvt_v2_b0", 3666760),
    "qwen3_vit": ("qwen3_vit_88m", 87414528),
    "rdnet": ("rdnet_tiny", 23863008),
    "regnet": ("regnetx_002", 2684792),
    "repghost": ("repghostnet_050", 2313968),
    "repvit": ("repvit_m1", 5485248),
    "res2net": ("res2next50", 24671464),
    "resnest": ("resnest14d", 10611688),
    "resnet": ("resnet10t", 5435488),
    "resnetv2": ("resnetv2_18", 11687720),
    "rexnet": ("rexnet_100", 4796873),
    "selecsls": ("selecsls42", 30354952),
    "senet": ("legacy_seresnet18", 11778592),
    "sequencer": ("sequencer2d_s", 27651688),
    "shvit": ("shvit_s1", 6330808),
    "sknet": ("skresnet18", 11958056),
    "starnet": ("starnet_s050", 542728),
    "swiftformer": ("swiftformer_xs", 3475360),
    "swin_transformer": ("swin_tiny_patch4_window7_224", 28288354),
    "swin_transformer_v2": ("swinv2_tiny_window16_256", 28347154),
    "swin_transformer_v2_cr": ("swinv2_cr_tiny_224", 28332124),
    "tiny_vit": ("tiny_vit_5m_224", 12082725),
    "tnt": ("tnt_s_legacy_patch16_224", 23755336),
    "tresnet": ("tresnet_m", 31389032),
    "twins": ("twins_svt_small", 24060776),
    "vgg": ("vgg11", 132863336),
    "visformer": ("visformer_tiny", 10321368),
    "vision_transformer": ("vit_tiny_patch16_224", 5717416),
    "vision_transformer_hybrid": ("vit_tiny_r_s16_p8_224", 6337704),
    "vision_transformer_relpos": ("vit_srelpos_small_patch16_224", 21973486),
    "vision_transformer_sam": ("samvit_base_patch16_224", 86457064),
    "vitamin": ("vitamin_small_224", 22173376),
    "volo": ("volo_d1_224", 26632040),
    "vovnet": ("ese_vovnet19b_slim_dw", 1897752),
    "xception": ("legacy_xception", 22855952),
    "xception_aligned": ("xception41p", 26907752),
    "xcit": ("xcit_nano_12_p8_224", 3049016),
}


def _meta_params(name: str) -> int | None:
    import timm

    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return count_params(timm.create_model(name, pretrained=False))
    except Exception:  # a model that cannot be built on meta: unknown size
        return None


def derive_timm_families(modules: list[str] | None = None) -> dict[str, tuple[str, int]]:
    """For each timm module (family), its smallest non-test model by parameter count (meta device)."""
    import timm

    out: dict[str, tuple[str, int]] = {}
    for module in modules if modules is not None else timm.list_modules():
        sizes = [(n, _meta_params(n)) for n in timm.list_models(module=module) if not n.startswith("test_")]
        sizes = [(n, p) for n, p in sizes if p is not None]
        if sizes:
            name, params = min(sizes, key=lambda s: (s[1], s[0]))
            out[module] = (name, params)
    return out


def timm_specs() -> list[Spec]:
    import timm

    families = dict(TIMM_FAMILIES)
    current = set(timm.list_modules())
    families = {k: v for k, v in families.items() if k in current}
    new = sorted(current - set(families))
    if new:  # a newer timm: derive just the modules the table does not know
        families.update(derive_timm_families(new))
    return [Spec("timm", name, module, params) for module, (name, params) in sorted(families.items())]


def _timm_build(name: str) -> Built:
    import timm

    cfg = timm.get_pretrained_cfg(name)
    cfg = cfg.to_dict() if cfg is not None and hasattr(cfg, "to_dict") else {}
    size = tuple(cfg.get("input_size") or (3, 224, 224))
    torch.manual_seed(0)
    model = randomize_norm_stats(timm.create_model(name, pretrained=False))
    # Smallest input first: 64x64 where the model accepts it, else its own input size.
    errors = []
    for hw in sorted({min(64, size[1]), min(128, size[1]), size[1]}):
        shape = (1, size[0], hw, hw * size[2] // size[1])
        err = _forward_ok(model, _images(shape)(0))
        if err is None:
            return Built(model, _images(shape), note=f"input {shape}")
        errors.append(f"{shape}: {err}")
    raise SkipModel("forward fails on every input size tried: " + "; ".join(errors))


# ---------------------------------------------------------------- torchvision
VIDEO = ("r3d_18", "mc3_18", "r2plus1d_18", "s3d", "mvit_v1_b", "mvit_v2_s", "swin3d_t")
SEGMENTATION = (
    "fcn_resnet50",
    "deeplabv3_resnet50",
    "deeplabv3_mobilenet_v3_large",
    "lraspp_mobilenet_v3_large",
    "fcn_resnet101",
    "deeplabv3_resnet101",
)
DETECTION = ("fpn_resnet18", "fpn_resnet50", "fpn_mobilenet_v3_large", "fpn_mobilenet_v3_small")


def torchvision_specs() -> list[Spec]:
    import torchvision
    from torchvision import models

    out = []
    for name in models.list_models(module=torchvision.models):
        family = models.get_model_builder(name).__module__.rsplit(".", 1)[-1]
        out.append(Spec("torchvision", name, family))
    out += [Spec("torchvision", n, "segmentation/" + n.split("_")[0]) for n in SEGMENTATION]
    out += [Spec("torchvision", n, "video/" + models.get_model_builder(n).__module__.rsplit(".", 1)[-1])
            for n in VIDEO]
    out += [Spec("torchvision", n, "detection/backbone_fpn") for n in DETECTION]
    return out


def _torchvision_build(name: str) -> Built:
    from torchvision import models
    from torchvision.models.detection import backbone_utils

    torch.manual_seed(0)
    if name in DETECTION:
        backbone = name.removeprefix("fpn_")
        if backbone.startswith("resnet"):
            model = backbone_utils.resnet_fpn_backbone(backbone_name=backbone, weights=None)
        else:
            model = backbone_utils.mobilenet_backbone(backbone_name=backbone, weights=None, fpn=True)
        return Built(randomize_norm_stats(model), _images((1, 3, 64, 64)), note="FrozenBatchNorm2d backbone")
    if name in SEGMENTATION:
        model = models.get_model(name, weights=None, weights_backbone=None, num_classes=21)
        return Built(randomize_norm_stats(model), _images((1, 3, 64, 64)))
    if name in VIDEO:
        if name.startswith("mvit"):
            raise SkipModel("the builder fixes the input at 16x224x224 (positional embeddings); too slow for a CPU sweep")
        model = randomize_norm_stats(models.get_model(name, weights=None))
        for shape in ((1, 3, 8, 64, 64), (1, 3, 16, 112, 112)):
            if _forward_ok(model, _images(shape)(0)) is None:
                return Built(model, _images(shape), note=f"input {shape}")
        raise SkipModel("forward fails on (1,3,8,64,64) and (1,3,16,112,112)")
    kwargs = {}
    if name.startswith("vit_"):
        kwargs = dict(image_size=64)  # ViT checks the image size; 64 keeps it fast
    if name == "inception_v3":
        kwargs = dict(aux_logits=False, init_weights=False)
    if name == "googlenet":
        kwargs = dict(aux_logits=False, init_weights=False)
    model = randomize_norm_stats(models.get_model(name, weights=None, **kwargs))
    for hw in (64, 96, 128, 224, 299):
        shape = (1, 3, hw, hw)
        if _forward_ok(model, _images(shape)(0)) is None:
            return Built(model, _images(shape), note=f"input {shape}")
    raise SkipModel("forward fails on every input size tried")


# ---------------------------------------------------------------- Hugging Face
_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
TEXT = dict(
    vocab_size=128,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    max_position_embeddings=64,
    attn_implementation="eager",
    **_IDS,
)
CAUSAL = dict(TEXT, num_key_value_heads=2, use_cache=False, tie_word_embeddings=False)
VISION = dict(num_channels=3, attn_implementation="eager")
VIT = dict(VISION, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
           image_size=32, patch_size=8)
AUDIO = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
             conv_dim=(32, 32), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
             num_conv_pos_embedding_groups=4, vocab_size=32, attn_implementation="eager", do_stable_layer_norm=False)
SEQ2SEQ = dict(vocab_size=128, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
               decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=64,
               attn_implementation="eager", use_cache=False, decoder_start_token_id=1, **_IDS)

# id -> (family, model class, config, input kind)
HF_MODELS: dict[str, tuple[str, str, dict[str, Any], str]] = {
    # encoders
    "bert": ("encoder", "BertModel", TEXT, "tokens"),
    "roberta": ("encoder", "RobertaModel", TEXT, "tokens"),
    "xlm_roberta": ("encoder", "XLMRobertaModel", TEXT, "tokens"),
    "distilbert": ("encoder", "DistilBertModel",
                   dict(vocab_size=128, dim=64, n_layers=2, n_heads=4, hidden_dim=128, max_position_embeddings=64,
                        attn_implementation="eager", pad_token_id=0), "tokens"),
    "albert": ("encoder", "AlbertModel", dict(TEXT, embedding_size=32), "tokens"),
    "electra": ("encoder", "ElectraModel", dict(TEXT, embedding_size=32), "tokens"),
    "deberta": ("encoder", "DebertaModel", TEXT, "tokens"),
    "deberta_v2": ("encoder", "DebertaV2Model", TEXT, "tokens"),
    "mpnet": ("encoder", "MPNetModel", TEXT, "tokens"),
    "ernie": ("encoder", "ErnieModel", TEXT, "tokens"),
    "megatron_bert": ("encoder", "MegatronBertModel", TEXT, "tokens"),
    "convbert": ("encoder", "ConvBertModel", dict(TEXT, embedding_size=64), "tokens"),
    "roformer": ("encoder", "RoFormerModel", TEXT, "tokens"),
    "data2vec_text": ("encoder", "Data2VecTextModel", TEXT, "tokens"),
    "modernbert": ("encoder", "ModernBertModel", dict(TEXT, global_attn_every_n_layers=2, local_attention=8,
                                                      cls_token_id=1, sep_token_id=2),
                   "tokens"),
    "xlnet": ("encoder", "XLNetModel",
              dict(vocab_size=128, d_model=64, n_layer=2, n_head=4, d_inner=128, attn_implementation="eager",
                   use_mems_eval=False, **_IDS), "tokens"),
    # decoders
    "gpt2": ("decoder", "GPT2LMHeadModel",
             dict(vocab_size=128, n_positions=64, n_embd=64, n_layer=2, n_head=4, n_inner=128, use_cache=False,
                  attn_implementation="eager", bos_token_id=1, eos_token_id=2), "tokens"),
    "gpt_neox": ("decoder", "GPTNeoXForCausalLM", dict(CAUSAL, rotary_pct=0.5), "tokens"),
    "llama_gqa": ("decoder", "LlamaForCausalLM", CAUSAL, "tokens"),
    "mistral": ("decoder", "MistralForCausalLM", dict(CAUSAL, sliding_window=None), "tokens"),
    "qwen2": ("decoder", "Qwen2ForCausalLM", CAUSAL, "tokens"),
    "qwen3": ("decoder", "Qwen3ForCausalLM", dict(CAUSAL, head_dim=16), "tokens"),
    "gemma": ("decoder", "GemmaForCausalLM", dict(CAUSAL, head_dim=16), "tokens"),
    "gemma2": ("decoder", "Gemma2ForCausalLM", dict(CAUSAL, head_dim=16, sliding_window=8), "tokens"),
    "gemma3_text": ("decoder", "Gemma3ForCausalLM", dict(CAUSAL, head_dim=16, sliding_window=8), "tokens"),
    "phi": ("decoder", "PhiForCausalLM", CAUSAL, "tokens"),
    "phi3": ("decoder", "Phi3ForCausalLM", CAUSAL, "tokens"),
    "falcon_mqa": ("decoder", "FalconForCausalLM",
                   dict(CAUSAL, multi_query=True, new_decoder_architecture=False, parallel_attn=True), "tokens"),
    "falcon_new": ("decoder", "FalconForCausalLM", dict(CAUSAL, new_decoder_architecture=True), "tokens"),
    "bloom": ("decoder", "BloomForCausalLM",
              dict(vocab_size=128, hidden_size=64, n_layer=2, n_head=4, use_cache=False,
                   attn_implementation="eager", **_IDS), "tokens"),
    "opt": ("decoder", "OPTForCausalLM", dict(CAUSAL, ffn_dim=128, word_embed_proj_dim=64), "tokens"),
    "gptj": ("decoder", "GPTJForCausalLM",
             dict(vocab_size=128, n_positions=64, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, use_cache=False,
                  attn_implementation="eager", bos_token_id=1, eos_token_id=2), "tokens"),
    "codegen": ("decoder", "CodeGenForCausalLM",
                dict(vocab_size=128, n_positions=64, n_ctx=64, n_embd=64, n_layer=2, n_head=4, rotary_dim=8,
                     use_cache=False, attn_implementation="eager", bos_token_id=1, eos_token_id=2), "tokens"),
    "gpt_neo": ("decoder", "GPTNeoForCausalLM",
                dict(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                     attention_types=[[["global", "local"], 1]], window_size=8, max_position_embeddings=64,
                     use_cache=False, attn_implementation="eager", bos_token_id=1, eos_token_id=2), "tokens"),
    "stablelm": ("decoder", "StableLmForCausalLM", CAUSAL, "tokens"),
    "olmo": ("decoder", "OlmoForCausalLM", CAUSAL, "tokens"),
    "olmo2": ("decoder", "Olmo2ForCausalLM", CAUSAL, "tokens"),
    "granite": ("decoder", "GraniteForCausalLM", CAUSAL, "tokens"),
    "cohere": ("decoder", "CohereForCausalLM", CAUSAL, "tokens"),
    "starcoder2": ("decoder", "Starcoder2ForCausalLM", dict(CAUSAL, sliding_window=None), "tokens"),
    "persimmon": ("decoder", "PersimmonForCausalLM", dict(CAUSAL, num_key_value_heads=4), "tokens"),
    "biogpt": ("decoder", "BioGptForCausalLM", TEXT, "tokens"),
    "xglm": ("decoder", "XGLMForCausalLM",
             dict(vocab_size=128, d_model=64, num_layers=2, attention_heads=4, ffn_dim=128,
                  max_position_embeddings=64, use_cache=False, attn_implementation="eager", **_IDS), "tokens"),
    "glm": ("decoder", "GlmForCausalLM", dict(CAUSAL, head_dim=16), "tokens"),
    "helium": ("decoder", "HeliumForCausalLM", dict(CAUSAL, head_dim=16), "tokens"),
    "smollm3": ("decoder", "SmolLM3ForCausalLM", CAUSAL, "tokens"),
    # mixture of experts
    "mixtral": ("moe", "MixtralForCausalLM", dict(CAUSAL, num_local_experts=4, num_experts_per_tok=2), "tokens"),
    "qwen2_moe": ("moe", "Qwen2MoeForCausalLM",
                  dict(CAUSAL, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                       shared_expert_intermediate_size=64), "tokens"),
    "qwen3_moe": ("moe", "Qwen3MoeForCausalLM",
                  dict(CAUSAL, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
                  "tokens"),
    "olmoe": ("moe", "OlmoeForCausalLM", dict(CAUSAL, num_experts=4, num_experts_per_tok=2), "tokens"),
    # vision
    "vit": ("vision", "ViTForImageClassification", dict(VIT, num_labels=10), "image32"),
    "deit": ("vision", "DeiTModel", VIT, "image32"),
    "beit": ("vision", "BeitModel", VIT, "image32"),
    "dinov2": ("vision", "Dinov2Model", VIT, "image32"),
    "data2vec_vision": ("vision", "Data2VecVisionModel", VIT, "image32"),
    "swin": ("vision", "SwinModel",
             dict(VISION, image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 4],
                  window_size=4), "image32"),
    "swinv2": ("vision", "Swinv2Model",
               dict(VISION, image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 4],
                    window_size=4), "image32"),
    "convnext": ("vision", "ConvNextForImageClassification",
                 dict(num_channels=3, num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], num_labels=10), "image32"),
    "convnextv2": ("vision", "ConvNextV2Model",
                   dict(num_channels=3, num_stages=2, hidden_sizes=[16, 32], depths=[1, 1]), "image32"),
    "resnet": ("vision", "ResNetForImageClassification",
               dict(num_channels=3, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                    layer_type="bottleneck", num_labels=10), "image32"),
    "regnet": ("vision", "RegNetModel",
               dict(num_channels=3, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], groups_width=8),
               "image32"),
    "segformer": ("vision", "SegformerModel",
                  dict(VISION, num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32],
                       patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2]),
                  "image32"),
    "pvt_v2": ("vision", "PvtV2Model",
               dict(VISION, num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32],
                    patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2]),
               "image32"),
    "levit": ("vision", "LevitModel",
              dict(num_channels=3, image_size=64, hidden_sizes=[32, 48, 64], num_attention_heads=[2, 3, 4],
                   depths=[1, 1, 1], key_dim=[8, 8, 8], patch_size=16), "image64"),
    "mobilevit": ("vision", "MobileViTModel",
                  dict(num_channels=3, image_size=32, hidden_sizes=[32, 48, 64],
                       neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64], num_attention_heads=4,
                       attn_implementation="eager"), "image32"),
    "efficientnet": ("vision", "EfficientNetModel",
                     dict(num_channels=3, image_size=32, width_coefficient=0.25, depth_coefficient=0.25, hidden_dim=320), "image32"),
    "mobilenet_v2": ("vision", "MobileNetV2Model",
                     dict(num_channels=3, image_size=32, depth_multiplier=0.25, min_depth=8), "image32"),
    "poolformer": ("vision", "PoolFormerModel",
                   dict(num_channels=3, hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1]), "image32"),
    "focalnet": ("vision", "FocalNetModel",
                 dict(num_channels=3, image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
                      hidden_sizes=[16, 32]), "image32"),
    "bit": ("vision", "BitModel",
            dict(num_channels=3, embedding_size=32, hidden_sizes=[32, 64], depths=[1, 1], layer_type="bottleneck",
                 num_groups=8), "image32"),
    # audio
    "wav2vec2": ("audio", "Wav2Vec2Model", AUDIO, "audio"),
    "hubert": ("audio", "HubertModel", AUDIO, "audio"),
    "wavlm": ("audio", "WavLMModel", dict(AUDIO, num_buckets=32, max_bucket_distance=64), "audio"),
    "data2vec_audio": ("audio", "Data2VecAudioModel", AUDIO, "audio"),
    "whisper_encoder": ("audio", "WhisperForAudioClassification",
                        dict(SEQ2SEQ, num_mel_bins=16, max_source_positions=16, num_labels=4), "mel"),
    # multimodal and sequence-to-sequence
    "clip_text": ("multimodal", "CLIPTextModel",
                  dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=128, max_position_embeddings=64, attn_implementation="eager", **_IDS),
                  "tokens"),
    "clip_vision": ("multimodal", "CLIPVisionModel", VIT, "image32"),
    "siglip_text": ("multimodal", "SiglipTextModel",
                    dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=128, max_position_embeddings=64, attn_implementation="eager", **_IDS),
                    "tokens"),
    "siglip_vision": ("multimodal", "SiglipVisionModel", VIT, "image32"),
    "t5": ("seq2seq", "T5Model",
           dict(vocab_size=128, d_model=64, d_kv=16, num_heads=4, d_ff=128, num_layers=2, use_cache=False,
                attn_implementation="eager", decoder_start_token_id=0, pad_token_id=0, eos_token_id=1), "seq2seq"),
    "t5_encoder": ("seq2seq", "T5EncoderModel",
                   dict(vocab_size=128, d_model=64, d_kv=16, num_heads=4, d_ff=128, num_layers=2,
                        attn_implementation="eager", pad_token_id=0, eos_token_id=1), "tokens"),
    "bart": ("seq2seq", "BartModel", SEQ2SEQ, "seq2seq"),
    "mbart": ("seq2seq", "MBartModel", SEQ2SEQ, "seq2seq"),
    "pegasus": ("seq2seq", "PegasusModel", SEQ2SEQ, "seq2seq"),
    "marian": ("seq2seq", "MarianMTModel", SEQ2SEQ, "seq2seq"),
    "m2m100": ("seq2seq", "M2M100Model", SEQ2SEQ, "seq2seq"),
}


def hf_specs() -> list[Spec]:
    return [Spec("hf", name, f"{fam}/{cls}") for name, (fam, cls, _, _) in HF_MODELS.items()]


def _positional(model: nn.Module, named: dict[str, torch.Tensor]) -> tuple:
    """``named`` as positional inputs in the order of ``model.forward`` (None for the ones between)."""
    order = [n for n, p in inspect.signature(model.forward).parameters.items()
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    last = max(order.index(k) for k in named)
    return tuple(named.get(n) for n in order[: last + 1])


def _hf_build(name: str) -> Built:
    import transformers
    from transformers.initialization import no_init_weights

    _family, cls_name, config, kind = HF_MODELS[name]
    cls = getattr(transformers, cls_name)
    torch.manual_seed(0)
    cfg = cls.config_class(**config)
    with no_init_weights():
        model = cls(cfg)
    _init_(model)
    model = randomize_norm_stats(model)
    vocab = getattr(cfg, "vocab_size", 128) or 128

    def ids(seed: int, n: int = 8) -> torch.Tensor:
        return torch.randint(3, vocab, (1, n), generator=torch.Generator().manual_seed(seed))

    if kind == "tokens":
        make = lambda seed: (ids(seed),)  # noqa: E731
    elif kind == "seq2seq":
        make = lambda seed: _positional(model, {"input_ids": ids(seed), "decoder_input_ids": ids(seed + 1000, 6)})  # noqa: E731
    elif kind.startswith("image"):
        hw = int(kind.removeprefix("image"))
        make = _images((1, 3, hw, hw))
    elif kind == "audio":
        make = _images((1, 1600))
    elif kind == "mel":
        make = _images((1, cfg.num_mel_bins, 2 * cfg.max_source_positions))
    else:
        raise ValueError(kind)
    kwargs = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    return Built(model.eval(), make, kwargs)


def _init_(model: nn.Module, std: float = 0.05) -> None:
    """Random normal matrices, small random biases, unit-ish norms (fast; no HF initialisers)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            elif pname.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            else:
                p.copy_(1.0 + torch.randn(p.shape, generator=gen) * 0.1)


# ---------------------------------------------------------------- entry points
QUICK = [
    Spec("torchvision", "resnet18", "resnet"),
    Spec("torchvision", "mobilenet_v3_small", "mobilenetv3"),
    Spec("torchvision", "shufflenet_v2_x0_5", "shufflenetv2"),
    Spec("torchvision", "fpn_resnet18", "detection/backbone_fpn"),
    Spec("timm", "resnet10t", "resnet", 5435488),
    Spec("timm", "convnext_zepto_rms", "convnext", 2155656),
    Spec("timm", "vit_tiny_patch16_224", "vision_transformer", 5717416),
    Spec("hf", "bert", "encoder/BertModel"),
    Spec("hf", "gpt2", "decoder/GPT2LMHeadModel"),
    Spec("hf", "llama_gqa", "decoder/LlamaForCausalLM"),
    Spec("hf", "mixtral", "moe/MixtralForCausalLM"),
    Spec("hf", "t5", "seq2seq/T5Model"),
    Spec("hf", "vit", "vision/ViTForImageClassification"),
]


def specs(only: str | None = None, quick: bool = False) -> list[Spec]:
    if quick:
        return [s for s in QUICK if only in (None, s.source)]
    out: list[Spec] = []
    if only in (None, "timm"):
        out += timm_specs()
    if only in (None, "torchvision"):
        out += torchvision_specs()
    if only in (None, "hf"):
        out += hf_specs()
    return out


def build(spec: Spec, max_params: int = MAX_PARAMS) -> Built:
    """Build one zoo model; :class:`SkipModel` with the reason if it is not run."""
    if spec.params is not None and spec.params > max_params:
        raise SkipModel(f"{spec.params / 1e6:.0f}M parameters > {max_params / 1e6:.0f}M cap (smallest of its family)")
    with warnings.catch_warnings(), contextlib.redirect_stdout(None):
        warnings.simplefilter("ignore")
        if spec.source == "torchvision" and spec.name not in DETECTION + SEGMENTATION:
            meta = _tv_meta_params(spec.name)
            if meta is not None and meta > max_params:
                raise SkipModel(f"{meta / 1e6:.0f}M parameters > {max_params / 1e6:.0f}M cap")
        builder = {"timm": _timm_build, "torchvision": _torchvision_build, "hf": _hf_build}[spec.source]
        built = builder(spec.name)
    n = count_params(built.model)
    if n > max_params:
        raise SkipModel(f"{n / 1e6:.0f}M parameters > {max_params / 1e6:.0f}M cap")
    return built


def _tv_meta_params(name: str) -> int | None:
    from torchvision import models

    try:
        with torch.device("meta"):
            return count_params(models.get_model(name, weights=None))
    except Exception:
        return None


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="zoo model lists")
    parser.add_argument("--derive-timm", action="store_true", help="recompute TIMM_FAMILIES (~7 CPU minutes)")
    args = parser.parse_args()
    if args.derive_timm:
        print(json.dumps(derive_timm_families(), indent=1))
    else:
        for s in specs():
            print(s.source, s.family, s.name, s.params or "")
