"""A block screen for Tkinter programs: while the agent says the shared data may not be used
(a sync under way, a failed sync), it covers the program's window with what is happening, a
progress bar and a "Try again now" button, and takes the keyboard and mouse from the widgets
below; when the data is ready it goes away.

Usage (the whole of it)::

    import tkinter as tk
    from synchub.tk import BlockScreen

    root = tk.Tk()
    ...  # build the program's window
    BlockScreen(root, on_ready=lambda s: reload_data())
    root.mainloop()

What to show is decided by :func:`describe`, which needs no display; importing this module
needs none either, only creating a :class:`BlockScreen` does. Agent events arrive on a
background thread and reach Tk through a queue read by ``after`` on Tk's own thread, since Tk
must only be touched from the thread that created it.
"""

from __future__ import annotations

import queue
import tkinter as tk
from dataclasses import dataclass
from tkinter import ttk
from typing import Callable, Dict, Optional, Sequence, Union

from .agent import Agent, SpaceStatus, SynchubError

TEXTS: Dict[str, Dict[str, str]] = {
    "en": {
        "title": "Shared data",
        "starting": "Checking for new data…",
        "ready": "Up to date",
        "required": "New data is available; the update starts in a moment.",
        "forced": "The administrator asked every PC to refresh its data.",
        "downloading": "Updating the shared data… {done} of {total} MB ({pct}%)",
        "verifying": "Checking the new data…",
        "applying": "Putting the new data in place…",
        "failed": "The update did not finish; it will be tried again.",
        "agent_down": "The sync program on this PC is not running.",
        "agent_down_detail": "Please wait a moment, or restart the PC; call IT if this stays.",
        "may_not": "Please do not use the program until this finishes.",
        "retry": "Try again now",
    },
    "ro": {
        "title": "Date comune",
        "starting": "Se verifică dacă există date noi…",
        "ready": "La zi",
        "required": "Sunt date noi; actualizarea începe imediat.",
        "forced": "Administratorul a cerut reîmprospătarea datelor pe toate calculatoarele.",
        "downloading": "Se actualizează datele comune… {done} din {total} MB ({pct}%)",
        "verifying": "Se verifică datele noi…",
        "applying": "Se instalează datele noi…",
        "failed": "Actualizarea nu s-a terminat; se va încerca din nou.",
        "agent_down": "Programul de sincronizare nu rulează pe acest calculator.",
        "agent_down_detail": "Așteptați puțin sau reporniți calculatorul; anunțați IT dacă rămâne așa.",
        "may_not": "Vă rugăm nu folosiți programul până la terminare.",
        "retry": "Încearcă din nou acum",
    },
}


@dataclass(frozen=True)
class Screen:
    """What the block screen shows. ``progress`` is 0.0–1.0 while downloading, else None."""

    blocked: bool
    headline: str
    detail: str = ""
    progress: Optional[float] = None
    retry: bool = False


def describe(
    spaces: Sequence[SpaceStatus],
    agent_error: Optional[str] = None,
    lang: str = "en",
    block_when_agent_down: bool = True,
) -> Screen:
    """The screen for the spaces' latest states. ``agent_error`` says the agent cannot be
    reached; then use stays blocked unless ``block_when_agent_down`` is false, in which case
    the last states seen decide."""
    t = TEXTS.get(lang, TEXTS["en"])
    if agent_error is not None and (block_when_agent_down or not spaces):
        return Screen(True, t["agent_down"], f"{t['agent_down_detail']}\n{agent_error}")
    blocked = [s for s in spaces if not s.allows_use]
    if not spaces:
        return Screen(True, t["starting"], t["may_not"])
    if not blocked:
        return Screen(False, t["ready"])
    s = blocked[0]
    if s.state == "downloading":
        total = max(s.bytes_total, 0)
        done = min(max(s.bytes_done, 0), total)
        pct = done * 100 // total if total else 0
        headline = t["downloading"].format(done=_mb(done), total=_mb(total), pct=pct)
        return Screen(True, headline, t["may_not"], s.progress or 0.0)
    if s.state == "sync_required":
        return Screen(True, t["forced"] if s.forced else t["required"], t["may_not"], retry=True)
    if s.state == "failed":
        why = s.error or s.last_error or ""
        return Screen(True, t["failed"], f"{t['may_not']}\n{why}".strip(), retry=True)
    headline = t.get(s.state, t["starting"])
    return Screen(True, headline, t["may_not"])


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f}"


class BlockScreen:
    """Covers ``master`` (the program's main window) while the shared data may not be used.

    ``space`` limits it to one space (default: every space the agent follows). ``on_ready``
    is called on Tk's thread with a space's status each time that space becomes usable at a
    new version (reload the data there). ``lang`` is ``en`` or ``ro``.
    """

    POLL_MS = 100

    def __init__(
        self,
        master: Union[tk.Tk, tk.Toplevel],
        agent: Optional[Agent] = None,
        space: Optional[str] = None,
        on_ready: Optional[Callable[[SpaceStatus], None]] = None,
        lang: str = "en",
        block_when_agent_down: bool = True,
    ) -> None:
        self.master = master
        self.agent = agent or Agent()
        self.space = space
        self.lang = lang
        self.block_when_agent_down = block_when_agent_down
        self._on_ready = on_ready
        self._spaces: Dict[str, SpaceStatus] = {}
        self._agent_error: Optional[str] = None
        self._usable_versions: Dict[str, int] = {}
        self._queue: "queue.Queue[Union[SpaceStatus, SynchubError]]" = queue.Queue()
        self.screen = describe([], None, lang, block_when_agent_down)

        t = TEXTS.get(lang, TEXTS["en"])
        self.frame = tk.Frame(master, background="#fff5f5", cursor="watch")
        inner = tk.Frame(self.frame, background="#fff5f5")
        inner.place(relx=0.5, rely=0.45, anchor="center", relwidth=0.85)
        self._title = tk.Label(inner, text=t["title"], background="#fff5f5", font=("", 14, "bold"))
        self._title.pack(pady=(0, 8))
        self._headline = tk.Label(inner, background="#fff5f5", font=("", 12), wraplength=480)
        self._headline.pack(pady=4)
        self._bar = ttk.Progressbar(inner, mode="determinate", maximum=1000)
        self._detail = tk.Label(inner, background="#fff5f5", foreground="#444", wraplength=480)
        self._detail.pack(pady=4)
        self._button = tk.Button(inner, text=t["retry"], command=self.retry)
        self.frame.bind("<Destroy>", self._destroyed, add="+")
        self._render()
        self._subscription = self.agent.subscribe(self._queue.put, self._queue.put)
        self._after: Optional[str] = self.master.after(self.POLL_MS, self._poll)

    @property
    def blocked(self) -> bool:
        """Whether the window is covered now."""
        return self.screen.blocked

    def retry(self) -> None:
        """The button: ask the agent to start or retry the sync now."""
        try:
            self.agent.sync_now()
        except SynchubError as e:
            self._queue.put(e)

    def close(self) -> None:
        """Stops following the agent and uncovers the window."""
        self._subscription.close()
        if self._after is not None:
            try:
                self.master.after_cancel(self._after)
            except tk.TclError:
                pass
            self._after = None
        try:
            self._hide()
        except tk.TclError:
            pass

    def _destroyed(self, event: "tk.Event[tk.Misc]") -> None:
        if event.widget is self.frame:
            self._subscription.close(timeout=0)

    def _poll(self) -> None:
        changed = False
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            changed = True
            if isinstance(item, SynchubError):
                self._agent_error = str(item)
            elif self.space is None or item.space == self.space:
                self._agent_error = None
                self._spaces[item.space] = item
                if item.allows_use and self._usable_versions.get(item.space) != item.version:
                    self._usable_versions[item.space] = item.version
                    if self._on_ready is not None:
                        self._on_ready(item)
                elif not item.allows_use:
                    self._usable_versions.pop(item.space, None)
        if changed:
            self.screen = describe(
                list(self._spaces.values()),
                self._agent_error,
                self.lang,
                self.block_when_agent_down,
            )
            self._render()
        elif self.screen.blocked and self.frame.grab_status() is None:
            self._grab()
        self._after = self.master.after(self.POLL_MS, self._poll)

    def _render(self) -> None:
        s = self.screen
        if not s.blocked:
            self._hide()
            return
        self._headline.configure(text=s.headline)
        self._detail.configure(text=s.detail)
        if s.progress is not None:
            self._bar.configure(value=int(s.progress * 1000))
            self._bar.pack(fill="x", pady=6, before=self._detail)
        else:
            self._bar.pack_forget()
        if s.retry:
            self._button.pack(pady=8)
        else:
            self._button.pack_forget()
        self.frame.place(x=0, y=0, relwidth=1, relheight=1)
        self.frame.lift()
        # Keys and clicks go to the cover alone, not to the program's widgets below it.
        self._grab()

    def _grab(self) -> None:
        try:
            self.frame.grab_set()
            self.frame.focus_set()
        except tk.TclError:
            pass  # not viewable yet (before mainloop); the next poll takes the grab

    def _hide(self) -> None:
        self.frame.grab_release()
        self.frame.place_forget()
