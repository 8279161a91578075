"""The comparison figures (matplotlib with the Agg backend, imported only when a figure is drawn).

Each module draws one figure and returns matplotlib's ``Figure`` (``draw_*``, for
the tests to read back) or writes it as a PNG (``plot_*``):

- :mod:`.runs`: median principal angles against epoch, one column per run and a
  row per stage (the paper's Figure 2);
- :mod:`.models`: angles against stage, one panel per model (Figure 5);
- :mod:`.kappas`: the blocks' condition numbers against epoch, one panel per run.

:mod:`.canvas` holds what they share: the backend, the atomic PNG writer, the
colour of each class.
"""
