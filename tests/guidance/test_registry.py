"""The registry's seams: every method is called the same way by the driver."""


def test_every_sampler_has_the_typed_seam_signature():
    # the driver calls every method the same way (guidance.samplers.Sampler): same names, kinds, defaults
    import inspect

    from guidance.registry import METHODS
    from guidance.samplers import Sampler

    want = inspect.signature(Sampler.__call__).parameters
    want = [(p.name, p.kind, p.default) for n, p in want.items() if n != "self"]
    for m in METHODS.values():
        got = [(p.name, p.kind, p.default) for p in inspect.signature(m.sampler).parameters.values()]
        assert got == want, m.name
        assert inspect.signature(m.sampler).parameters["config"].annotation == m.config.__name__, m.name
