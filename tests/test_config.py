"ConfigMixin as diffusers' users rely on it: config keys read as attributes, the config recorded on save, copies."
import copy, pickle, tempfile, warnings
import pytest, torch
import diffusers
from minidiff import DDPMScheduler, EulerDiscreteScheduler, UniPCMultistepScheduler, UNet2DModel


@pytest.mark.parametrize('cls', [DDPMScheduler, EulerDiscreteScheduler, UniPCMultistepScheduler])
def test_config_key_as_attribute_warns_like_diffusers(cls):
    ours, ref = cls(), getattr(diffusers, cls.__name__)()
    for s in (ours, ref): s.register_to_config(test_attribute=5)
    with pytest.warns(FutureWarning) as got: value = ours.test_attribute
    with pytest.warns(FutureWarning) as want: ref_value = ref.test_attribute
    assert value == ref_value == 5 and str(got[0].message) == str(want[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # a real attribute reads without a warning
        assert ours.timesteps is not None and ours.config.num_train_timesteps == 1000
    with pytest.raises(AttributeError) as e: ours.does_not_exist
    with pytest.raises(AttributeError) as e_ref: ref.does_not_exist
    assert str(e.value) == str(e_ref.value) == f"'{cls.__name__}' object has no attribute 'does_not_exist'"
    assert not hasattr(ours, 'does_not_exist')


def test_copies_and_pickles_still_work():
    s = EulerDiscreteScheduler(beta_schedule='scaled_linear')
    for t in (copy.deepcopy(s), pickle.loads(pickle.dumps(s))):
        assert t.config == s.config and torch.equal(t.sigmas, s.sigmas)


@pytest.mark.parametrize('cls', [DDPMScheduler, EulerDiscreteScheduler, UniPCMultistepScheduler])
def test_save_records_class_name_and_version(cls):
    s, ref = cls(num_train_timesteps=500), getattr(diffusers, cls.__name__)(num_train_timesteps=500)
    with tempfile.TemporaryDirectory() as d:
        s.save_pretrained(d); reloaded = cls.from_pretrained(d)
    with tempfile.TemporaryDirectory() as d: ref.save_pretrained(d)
    live = {k: v for k, v in s.config.items() if k != '_use_default_values'}
    assert live == dict(reloaded.config)
    assert s.config._class_name == cls.__name__ and s.config['_diffusers_version'] == ref.config['_diffusers_version']
    assert set(s.config) == set(ref.config)


def test_model_save_records_class_name():
    m = UNet2DModel(sample_size=8, block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4,
                    down_block_types=('DownBlock2D', 'DownBlock2D'), up_block_types=('UpBlock2D', 'UpBlock2D'))
    with tempfile.TemporaryDirectory() as d:
        m.save_pretrained(d)
        again = UNet2DModel.from_pretrained(d)
    assert m.config._class_name == 'UNet2DModel'
    assert set(m.config) - {'_use_default_values'} == set(again.config) - {'_use_default_values'}


@pytest.mark.parametrize('cls', [DDPMScheduler, EulerDiscreteScheduler, UniPCMultistepScheduler])
def test_no_deprecated_kwargs(cls):
    assert cls._deprecated_kwargs == []
