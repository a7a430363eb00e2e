"""Malformed Qwen3-MoE and Mixtral config.json values: each is one LocalrunError naming the field (one
`error:` line and a non-zero exit from the CLI), never a Python error or a silently planned other model.
Valid configs (the released ones, what transformers writes) still load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from localrun.config import args_from_dict, load_config
from localrun.errors import LocalrunError
from localrun.models import family
from localrun.plan import Budget, make_plan

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
CONFIGS = {"qwen3_moe": "qwen3-30b-a3b.config.json", "mixtral": "mixtral-8x7b.config.json"}
DROP = object()  # a change that removes the field


def reference(model_type: str) -> dict:
    return json.loads((REFERENCE / CONFIGS[model_type]).read_text())


def put(cfg: dict, name: str, value) -> None:
    if value is DROP:
        cfg.pop(name, None)
    else:
        cfg[name] = value


def changed(model_type: str, change: dict) -> dict:
    cfg = reference(model_type)
    for name, value in change.items():
        put(cfg, name, value)
    return cfg


# Both families read these the same way: (change, the field the error must name).
SHARED = [
    ({"num_hidden_layers": "48"}, "num_hidden_layers"),
    ({"num_hidden_layers": 4.5}, "num_hidden_layers"),
    ({"num_hidden_layers": 0}, "num_hidden_layers"),
    ({"hidden_size": -4}, "hidden_size"),
    ({"hidden_size": True}, "hidden_size"),
    ({"hidden_size": DROP}, "hidden_size"),
    ({"vocab_size": 2**64}, "vocab_size"),
    ({"intermediate_size": None}, "intermediate_size"),
    ({"num_key_value_heads": 5}, "num_key_value_heads"),
    ({"num_key_value_heads": "8"}, "num_key_value_heads"),
    ({"num_attention_heads": [32]}, "num_attention_heads"),
    ({"num_experts_per_tok": 200}, "num_experts_per_tok"),
    ({"num_experts_per_tok": 0}, "num_experts_per_tok"),
    ({"num_experts_per_tok": DROP}, "num_experts_per_tok"),
    ({"head_dim": 3}, "head_dim"),
    ({"head_dim": 0}, "head_dim"),
    ({"head_dim": None, "hidden_size": 96, "num_attention_heads": 32}, "head_dim"),  # 96 // 32 = 3: odd
    ({"max_position_embeddings": 0}, "max_position_embeddings"),
    ({"rms_norm_eps": 0}, "rms_norm_eps"),
    ({"rms_norm_eps": "1e-6"}, "rms_norm_eps"),
    ({"rope_theta": -1}, "rope_theta"),
    ({"rope_theta": None}, "rope_theta"),
    ({"rope_theta": float("inf")}, "rope_theta"),
    ({"rope_scaling": "linear"}, "rope_scaling"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": "1e6"}}, "rope_parameters.rope_theta"),
    ({"rope_parameters": [["rope_type", "default"]]}, "rope_parameters"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "original_max_position_embeddings"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 0.5, "original_max_position_embeddings": 4096}}, "factor"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": 8, "beta_fast": -1}},
     "beta_fast"),
    ({"rope_scaling": {"type": "linear"}}, "factor"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 4.0}}, "rope_type"),
    ({"hidden_act": ["silu"]}, "hidden_act"),
    ({"hidden_act": "relu2"}, "hidden_act"),
    ({"sliding_window": 0}, "sliding_window"),
    ({"sliding_window": "4096"}, "sliding_window"),
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings"),
    ({"eos_token_id": "2"}, "eos_token_id"),
    ({"eos_token_id": []}, "eos_token_id"),
    ({"eos_token_id": [2, -1]}, "eos_token_id"),
    ({"bos_token_id": -1}, "bos_token_id"),
    ({"pad_token_id": 1.5}, "pad_token_id"),
]
QWEN = [
    ({"num_experts": 0}, "num_experts"),
    ({"num_experts": DROP}, "num_experts"),
    ({"num_experts": DROP, "num_local_experts": "128"}, "num_local_experts"),  # transformers 5.24's spelling
    ({"num_experts": DROP, "num_local_experts": 4}, "num_experts_per_tok"),  # top-8 of 4
    ({"moe_intermediate_size": -768}, "moe_intermediate_size"),
    ({"decoder_sparse_step": 0}, "decoder_sparse_step"),
    ({"norm_topk_prob": 1}, "norm_topk_prob"),
    ({"attention_bias": None}, "attention_bias"),
    ({"use_sliding_window": "yes"}, "use_sliding_window"),
    ({"mlp_only_layers": [48]}, "mlp_only_layers"),
    ({"mlp_only_layers": [1, "2"]}, "mlp_only_layers"),
    ({"mlp_only_layers": 3}, "mlp_only_layers"),
]
MIXTRAL = [
    ({"num_local_experts": 0}, "num_local_experts"),
    ({"num_local_experts": DROP}, "num_local_experts"),
    ({"num_local_experts": 8.0}, "num_local_experts"),
    ({"num_experts_per_tok": 9}, "num_experts_per_tok"),  # of 8
]
CASES = ([pytest.param("qwen3_moe", *case, id=f"qwen3_moe-{case[1]}-{i}") for i, case in enumerate(SHARED + QWEN)]
         + [pytest.param("mixtral", *case, id=f"mixtral-{case[1]}-{i}") for i, case in enumerate(SHARED + MIXTRAL)])


@pytest.mark.parametrize("model_type, change, field", CASES)
def test_bad_value_is_an_error_naming_the_field(model_type, change, field):
    with pytest.raises(LocalrunError) as e:
        args_from_dict(changed(model_type, change))
    assert field in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("model_type, change, field", CASES)
def test_fit_on_a_bad_value_fails_in_one_line(cli, tmp_path, model_type, change, field):
    (tmp_path / "config.json").write_text(json.dumps(changed(model_type, change)))
    code, out, err = cli("fit", tmp_path, "--gpu", "4090")
    lines = err.strip().splitlines()
    assert code != 0 and "Traceback" not in err and "run with --verbose" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and field in lines[0], err


@pytest.mark.parametrize("model_type", list(CONFIGS))
def test_fit_on_the_released_configs(cli, tmp_path, model_type):
    (tmp_path / "config.json").write_text(json.dumps(reference(model_type)))
    code, out, err = cli("fit", tmp_path, "--gpu", "4090")
    assert code == 0, err


@pytest.mark.parametrize("model_type", list(CONFIGS))
def test_what_transformers_writes_loads(tmp_path, model_type):
    """transformers 5.24's spelling: num_local_experts for Qwen3 too, no head_dim, null ids."""
    transformers = pytest.importorskip("transformers")
    config = {"qwen3_moe": transformers.Qwen3MoeConfig, "mixtral": transformers.MixtralConfig}[model_type]()
    config.to_json_file(tmp_path / "config.json")
    args = load_config(tmp_path)
    assert (args.model_type, args.head_dim) == (model_type, args.hidden_size // args.num_attention_heads)
    assert 1 <= args.num_experts_per_tok <= args.num_experts


def test_mixtral_ignores_what_its_transformers_class_does_not_read():
    args = args_from_dict(changed("mixtral", {"attention_bias": True, "decoder_sparse_step": 2}))
    assert not args.attention_bias and all(args.has_experts(i) for i in range(args.num_hidden_layers))


# Any JSON value in any field: a load or a LocalrunError -------------------------------------------

JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-3, 300), st.sampled_from([0, -1, 2**31, 2**64]),
                         st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8))
JSON = st.recursive(JSON_SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                    max_leaves=10)
ROPE = st.fixed_dictionaries({}, optional={"rope_type": st.sampled_from(["default", "yarn", "linear", "dynamic", 1]),
                                           "type": st.sampled_from(["default", "linear", "yarn"]), "rope_theta": JSON,
                                           "factor": st.one_of(JSON, st.floats(0.5, 64)),
                                           "original_max_position_embeddings": st.one_of(JSON, st.integers(1, 1 << 20)),
                                           "attention_factor": JSON, "beta_fast": JSON, "truncate": JSON})
# Fields the references leave out that the families still read.
EXTRA_KEYS = ["head_dim", "rope_parameters", "num_experts", "num_local_experts", "use_sliding_window",
              "decoder_sparse_step", "mlp_only_layers", "pad_token_id", "norm_topk_prob", "attention_bias"]


@st.composite
def mutated_config(draw):
    model_type = draw(st.sampled_from(list(CONFIGS)))
    cfg = reference(model_type)
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(sorted(set(cfg) | set(EXTRA_KEYS))))
        if key == "model_type":
            continue
        put(cfg, key, draw(st.one_of(JSON, ROPE, st.just(DROP))))
    return cfg


def assert_sane(args) -> None:
    """What the planner and the model rely on of an accepted config."""
    assert args.head_dim > 0 and args.head_dim % 2 == 0
    assert args.num_attention_heads % args.num_key_value_heads == 0
    assert 1 <= args.top_k_experts <= args.num_experts
    assert args.rope_parameters["rope_theta"] > 0


@settings(max_examples=400, derandomize=True, deadline=None, database=None, print_blob=True,
          suppress_health_check=list(HealthCheck))
@given(cfg=mutated_config())
def test_any_value_in_any_field_loads_or_fails_cleanly(cfg):
    try:
        args = args_from_dict(cfg)
        assert_sane(args)
        family(cfg["model_type"]).checkpoint_shapes(args)
        make_plan(args, Budget(device_bytes=24 << 30, context=min(4096, args.max_position_embeddings)))
    except LocalrunError as e:
        assert "\n" not in str(e), str(e)
