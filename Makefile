# Every target creates .venv on first use and installs the project into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The shared data sets beside the checkout, when present (CI, developers); a user without them
# gets the files downloaded into ~/.cache/nets on first use.
ifneq ($(wildcard ../shared/data),)
export NETS_DATA_DIR ?= $(abspath ../shared/data)
endif

.PHONY: run test test-gradients lint gradcheck xor bench bench-quick mutants clean $(REPRODUCTIONS)

# One target per reproduction: `make lenet1989` runs `python -m experiments.lenet1989`.
REPRODUCTIONS := lenet1989 lenet5 seed_table curvature adding_problem vanishing char_rnn \
	char_transformer \
	precision pretraining memory_time depth scaling alexnet_step layer_profile xla_profile \
	private memory_tradeoffs largest_eigenvalue hessian_free adding_hessian_free kfac
$(REPRODUCTIONS): $(VENV)/.installed
	$(PY) -m experiments.$@

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

run: $(VENV)/.installed
	$(PY) -m experiments.lecture

test: $(VENV)/.installed
	$(PY) -m pytest -n 2 -q

# Every hand-written gradient, curvature and tangent of the layers, losses, combinators, models
# and recurrent and attention nets against its reference, the gradient report's own tests, and
# that no hand-written pass is differentiated by JAX (tests/test_by_hand.py):
# the files to run after writing a layer (a fifth of the suite's time).
GRADIENT_TESTS := layers losses combinators conv pooling normalization engines models recurrent \
	attention gradcheck by_hand
test-gradients: $(VENV)/.installed
	$(PY) -m pytest -n 2 -q $(GRADIENT_TESTS:%=tests/test_%.py)

# One-operator mutants of the hand-written derivatives and checkers, each run against the tests (114 at
# seed 0: over an hour on 2 cores): tests/mutants.py.
mutants: $(VENV)/.installed
	$(PY) -m tests.mutants

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check nets training experiments tests

gradcheck: $(VENV)/.installed
	$(PY) -m experiments.gradcheck

xor: $(VENV)/.installed
	$(PY) -m experiments.xor_restarts

# The benchmark suite; PyTorch (the reference for some families) is installed if absent.
bench: $(VENV)/.installed
	$(PY) -m pip install --quiet 'torch==2.13.0'
	$(PY) -m experiments.bench

bench-quick: $(VENV)/.installed
	$(PY) -m pip install --quiet 'torch==2.13.0'
	$(PY) -m experiments.bench --quick

clean:
	rm -rf $(VENV) *.egg-info runs .pytest_cache

.PHONY: lenet1989-seeds
# LeCun's method with the best settings found here, at ten seeds (README.md, "Experiments").
lenet1989-seeds: $(VENV)/.installed
	$(PY) -m experiments.seeds --experiment lenet1989 --seeds 0-9 --jobs 2 \
		--metrics test_misses,test_error,train_misses,test_loss --at-most test_misses=100 \
		-- --optimizer sdlm --init fan_in --schedule constant --lr 2e-4 --target 0.577

.PHONY: lenet1989-shuffled-seeds
# The best SDLM setting found here, digits shuffled every pass, at the thirty seeds of the
# README's mean of 102.7 misses (about 5 min on 2 cores).
lenet1989-shuffled-seeds: $(VENV)/.installed
	$(PY) -m experiments.seeds --experiment lenet1989 --seeds 0-29 --jobs 2 \
		--metrics test_misses,test_error,train_misses,test_loss --at-most test_misses=100 \
		-- --optimizer sdlm --init fan_in --schedule constant --mu 0.03 --lr 3e-4 \
		--target 0.577 --order shuffled

.PHONY: lenet1989-orders
# The README's three presentation orders for that setting at seeds 0-29, each against the
# file's order with paired standard errors (means 106.0, 105.4, 102.7; about 13 min on 2 cores).
lenet1989-orders: $(VENV)/.installed
	$(PY) -m experiments.grid --experiment lenet1989 --seeds 0-29 --jobs 2 \
		--metrics test_misses,train_misses \
		--settings "--order constant; --order permuted; --order shuffled" \
		-- --optimizer sdlm --init fan_in --schedule constant --mu 0.03 --lr 3e-4 --target 0.577

.PHONY: lenet1989-held-out
# The README's table "Choosing the 1989 settings without the test set": 19 settings at seeds 0-4,
# each trained on all but the last 1,000 training digits and measured on those (15 min on 2 cores).
SDLM_FAN_IN := --optimizer sdlm --init fan_in --schedule constant
HELD_OUT_SETTINGS := --lr 0.003; --lr 0.006; --lr 0.01; --lr 0.015; --lr 0.02; \
	--lr 0.01 --target 0.577; \
	--init fan_in --lr 0.006; --init fan_in --lr 0.01; --init fan_in --lr 0.015; \
	$(SDLM_FAN_IN) --lr 2e-4 --target 0.577; $(SDLM_FAN_IN) --lr 2e-4; \
	$(SDLM_FAN_IN) --mu 0.05 --lr 5e-4 --target 0.577; \
	$(SDLM_FAN_IN) --mu 0.01 --lr 1e-4 --target 0.577; \
	--optimizer sdlm --schedule constant --lr 2e-4 --target 0.577; \
	--optimizer sdlm; --optimizer sdlm --init fan_in --target 0.577; \
	$(SDLM_FAN_IN) --mu 0.03 --lr 3e-4 --target 0.577; \
	$(SDLM_FAN_IN) --lr 2e-4 --target 0.577 --order shuffled; \
	$(SDLM_FAN_IN) --mu 0.03 --lr 3e-4 --target 0.577 --order shuffled
lenet1989-held-out: $(VENV)/.installed
	$(PY) -m experiments.grid --experiment lenet1989 --seeds 0-4 --jobs 2 \
		--metrics held_out_misses,test_misses --settings "$(HELD_OUT_SETTINGS)" \
		-- --held-out 1000

.PHONY: lenet5-outputs
# LeNet-5 trained by SDLM with the paper's RBF output and MAP criterion, and with a Dense output
# and softmax, seeds 0-4 each (README.md, "LeNet-5"; about 8 min on 2 cores).
lenet5-outputs: $(VENV)/.installed
	$(PY) -m experiments.grid --experiment lenet5 --seeds 0-4 --jobs 2 \
		--metrics test_misses,train_misses --settings "--output rbf; --output dense" \
		-- --split test-only --optimizer sdlm

.PHONY: multihost-demo
# Two CPU processes on 127.0.0.1 train the MLP data-parallel and compare with one device
# (README.md, "Over examples, devices and hosts").
multihost-demo: $(VENV)/.installed
	$(PY) -m experiments.multihost_demo --launch 2
