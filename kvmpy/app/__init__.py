"""The application on top of the object layer: the ``kvmpy`` command (cli), ``kvmpy run``
(run), the capability table renderer (render_caps) and the regression-power self-check
(faultcheck). Nothing below kvmpy/app imports it."""
