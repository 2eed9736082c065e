"""model_config.from_config_dict: the one way apps build a model config from config.model."""
import ml_collections
import pytest

import tfx_jax as tfx
from tfx_jax.model_config import from_config_dict


def test_builds_from_a_config_dict_or_mapping_with_derived_fields():
    section = ml_collections.ConfigDict(dict(d_model=16, num_heads=2, d_ff=32, num_layers=1))
    cfg = from_config_dict(tfx.CausalLMConfig, section, vocab_size=11, max_len=7)
    assert (cfg.vocab_size, cfg.max_len, cfg.d_model, cfg.num_layers) == (11, 7, 16, 1)
    assert from_config_dict(tfx.CausalLMConfig, dict(section), vocab_size=11) == \
        tfx.CausalLMConfig(vocab_size=11, d_model=16, num_heads=2, d_ff=32, num_layers=1)
    assert from_config_dict(tfx.ViTConfig, None) == tfx.ViTConfig()


@pytest.mark.parametrize("section, derived, message", [
    (dict(vocab_size=5), dict(vocab_size=11), r"config.model.vocab_size is derived by the run "
                                              r"\(vocab_size=11 "),
    (dict(decode=True), dict(vocab_size=11), r"config.model.decode is set by the code"),
    (dict(d_modl=16, num_layer=1), dict(vocab_size=11),
     r"config.model has keys \['d_modl', 'num_layer'\] that CausalLMConfig does not know; "
     r"known: \[.*'d_model'"),
    (dict(d_model=10, num_heads=4), dict(vocab_size=11),
     r"CausalLMConfig.d_model=10 is not divisible by num_heads=4"),
    (dict(dropout_rate="high"), dict(vocab_size=11),
     r"config.model: bad value for CausalLMConfig"),
])
def test_names_the_bad_key_in_one_value_error(section, derived, message):
    with pytest.raises(ValueError, match=message):
        from_config_dict(tfx.CausalLMConfig, section, **derived)


def test_rejects_a_section_that_is_not_a_mapping():
    with pytest.raises(TypeError, match="config.model must be a mapping of ViTConfig fields, "
                                        "got list"):
        from_config_dict(tfx.ViTConfig, [("d_model", 16)])
