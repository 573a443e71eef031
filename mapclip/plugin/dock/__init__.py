"""The MapCLIP dock, one module per tab and panel.

- ``shell``: :class:`MapClipDock`: the tabs, shared state, Run/Cancel, status, the packages banner.
- ``search_form``: the Search tab's fields, the Advanced group, the values stored per model.
- ``search_run``: starting searches, progress, the preview, the results list.
- ``archive``: the Archive tab (index build, search, hits).
- ``describe``: the Describe panel (caption model, bank, describe jobs).
- ``widgets``: the choices, item roles, the scroll area and results list they share.
"""
