"""What a search has spent and what it may still start: trials that ran (finished, pruned or
failed while training: `ran` true or from the record), their recorded training hours and images,
against the grid file's `trials` and `hours`; a proposal of a setting already run is a repeat
and costs nothing."""
from optuna.trial import TrialState

SPENT = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


class Budget:
    def __init__(self, grid, study, finite):
        self.trials, self.hours = grid["search"]["trials"], grid["search"]["hours"]
        self.finite = finite  # every setting, where the space is finite (grid/space.settings)
        self.done_rows, self.outcomes = {}, {}  # row -> trial number; number -> (state, value)
        self.counted, self.train_s, self.images, self.pruned = 0, 0.0, 0, 0
        for t in study.get_trials(deepcopy=False, states=SPENT):
            if "ran" in t.user_attrs and "repeat_of" not in t.user_attrs:
                self.told(t.user_attrs, t.state, t.number, t.value)

    def told(self, attrs, state, number=None, value=None):
        """Count a trial that ran (or came from the record)."""
        if state == TrialState.FAIL and attrs.get("epochs") is None:
            return  # it never trained: not spent, not done
        self.counted += 1
        self.pruned += state == TrialState.PRUNED
        self.train_s += attrs.get("train_s") or 0.0
        self.images += (attrs.get("train_images") or 0) * (attrs.get("epochs") or 0)
        if number is not None and attrs.get("row"):
            self.done_rows[attrs["row"]] = number
            self.outcomes[number] = (state, value)

    def value_of(self, number):
        return self.outcomes[number][1]

    def state_of(self, number):
        return self.outcomes[number][0]

    def left(self, running):
        """Whether another trial may start beside `running` ones."""
        return self.counted + running < self.trials and (
            self.hours is None or self.train_s / 3600 < self.hours)

    def exhausted(self):
        return self.finite is not None and len(self.done_rows) >= len(self.finite)

    def summary(self):
        return (f"search spent {self.counted} trial(s) ({self.pruned} pruned), "
                f"{self.images:,} images trained, {self.train_s / 3600:.2f} h of training")
