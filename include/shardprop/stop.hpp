// A request to stop training at the next step boundary, made from a signal handler (SIGTERM,
// SIGINT, SIGUSR1 under a batch scheduler). Trainer::run agrees on it with every rank, writes
// a checkpoint of that step and returns; the program then exits with kExitStopped.
#pragma once

namespace shardprop {

// Records `signal` as the reason to stop (the first one stays). Async-signal-safe.
void request_stop(int signal) noexcept;
// The signal that asked to stop, or 0.
int stop_signal() noexcept;
// Forgets a request (tests, and a program that trains again).
void clear_stop() noexcept;

}  // namespace shardprop
