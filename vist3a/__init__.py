"""vist3a: text -> 3D Gaussian-splat scenes (VIST3A) as a library. Pure PyTorch; imports no Ray."""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy: `import vist3a` stays cheap (no torch/diffusers import) for config-only users.
    if name in ("generate_scene", "SceneGenerator", "Scene", "scene_files"):
        from vist3a import generator

        return getattr(generator, name)
    if name in ("load_config", "build_config", "Config", "ConfigError"):
        from vist3a import config

        return getattr(config, name)
    raise AttributeError(name)
