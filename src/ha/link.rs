//! The reconnect loop: one connection at a time, exponential back-off with jitter after a
//! loss, and a hold on a token HA rejected (HA bans an address after repeated failures).

use std::rc::Rc;
use std::time::Duration;

use smol::Timer;
use smol::future::FutureExt;

use super::connection::{self, End};
use crate::hub::{Command, Hub, LinkSettings};
use crate::shutdown::Shutdown;
use crate::status::LinkState;

/// How often one rejected token is tried again before hass-edge waits for a new one. HA
/// counts every `auth_invalid` toward its IP ban (`http.login_attempts_threshold`, e.g. 5)
/// and forgets the count only on a successful login (HA `components/http/ban.py`), so any
/// fixed retry period would end in a ban: 1 + 2 retries stays below a threshold of 5.
pub const SAME_TOKEN_RETRIES: u32 = 2;

/// Back-off before attempt `attempt` (1-based): 2^attempt s plus 0–10 % jitter, at most
/// `max_delay`. `jitter` is in `0.0..1.0`.
pub fn backoff_delay(attempt: u32, max_delay: Duration, jitter: f64) -> Duration {
    let base = Duration::from_secs(1u64 << attempt.min(20));
    base.mul_f64(1.0 + 0.1 * jitter.clamp(0.0, 1.0))
        .min(max_delay)
}

/// Runs the link until `shutdown` resolves. Returns `Err` only when `max_attempts` is used up.
pub async fn run(
    hub: Rc<Hub>,
    mut settings: LinkSettings,
    shutdown: Shutdown,
) -> Result<(), String> {
    let commands = hub.commands();
    let mut attempts: u32 = 0;
    // Failures of the current token (see SAME_TOKEN_RETRIES).
    let mut token_failures: u32 = 0;
    loop {
        if token_failures > SAME_TOKEN_RETRIES {
            // Hold: re-read the token every max_delay; try again only once it changed.
            let max_delay = hub.config().reconnect.max_delay;
            let token = hub.config().read_token();
            match token {
                Ok(token) if token != settings.token => {
                    crate::logging::redact(&token);
                    log::info!("the access token changed; trying it");
                    settings.token = token.clone();
                    hub.replace_rest_token(token);
                    token_failures = 0;
                }
                _ => {
                    match pause(max_delay, &commands, &shutdown).await {
                        Wake::Command(Command::Reconnect(new)) => {
                            settings = *new;
                            token_failures = 0;
                        }
                        Wake::Shutdown => return Ok(()),
                        _ => {}
                    }
                    continue;
                }
            }
        }
        hub.update_link(|l| l.state = LinkState::Connecting);
        let end = connection::run(&hub, &settings, &commands, &shutdown).await;
        let (max_attempts, max_delay) = {
            let c = hub.config();
            (c.reconnect.max_attempts, c.reconnect.max_delay)
        };
        let delay = match end {
            End::Shutdown => return Ok(()),
            End::Reconnect(new) => {
                settings = *new;
                hub.link_lost("reconnecting with new settings");
                attempts = 0;
                token_failures = 0;
                continue;
            }
            End::AuthInvalid(message) => {
                hub.count_link(|c| {
                    c.auth_failures += 1;
                    c.reconnects += 1;
                });
                attempts = attempts.saturating_add(1);
                token_failures += 1;
                let delay = max_delay.mul_f64(1.0 + 0.1 * fastrand::f64());
                if token_failures > SAME_TOKEN_RETRIES {
                    log::error!(
                        "Home Assistant rejected the access token {token_failures} times ({message}); not sending it again (HA would ban this address): write a valid token and restart or reload hass-edge"
                    );
                } else {
                    log::error!(
                        "Home Assistant rejected the access token ({message}); next attempt in {}s",
                        delay.as_secs()
                    );
                }
                hub.link_lost(&format!("auth_invalid: {message}"));
                hub.update_link(|l| {
                    l.state = LinkState::AuthFailed;
                    l.reconnect_attempts = attempts;
                });
                delay
            }
            End::Lost { reason, synced } => {
                hub.count_link(|c| c.reconnects += 1);
                if synced {
                    attempts = 0;
                    token_failures = 0;
                }
                attempts = attempts.saturating_add(1);
                let delay = backoff_delay(attempts, max_delay, fastrand::f64());
                log::warn!(
                    "connection to Home Assistant lost: {reason}; attempt {attempts} in {:.1}s",
                    delay.as_secs_f64()
                );
                hub.link_lost(&reason);
                hub.update_link(|l| {
                    l.state = LinkState::Backoff;
                    l.reconnect_attempts = attempts;
                });
                delay
            }
        };
        if max_attempts > 0 && attempts >= max_attempts {
            return Err(format!(
                "gave up after {attempts} failed attempts to reach Home Assistant (reconnect.max_attempts)"
            ));
        }
        // Wait out the back-off; a Resync or new settings cut it short.
        match pause(delay, &commands, &shutdown).await {
            Wake::Command(Command::Reconnect(new)) => settings = *new,
            Wake::Shutdown => return Ok(()),
            _ => {}
        }
    }
}

/// Waits `delay`, or until a command arrives or shutdown starts, whichever is first.
async fn pause(
    delay: Duration,
    commands: &smol::channel::Receiver<Command>,
    shutdown: &Shutdown,
) -> Wake {
    async {
        Timer::after(delay).await;
        Wake::Timer
    }
    .or(async {
        loop {
            match commands.recv().await {
                // No link to pass: dropping the channel answers it (it waits no more).
                Ok(Command::Barrier(_)) => continue,
                Ok(command) => return Wake::Command(command),
                Err(_) => return Wake::Timer,
            }
        }
    })
    .or(async {
        shutdown.wait().await;
        Wake::Shutdown
    })
    .await
}

/// Why a pause ended.
enum Wake {
    Timer,
    Command(Command),
    Shutdown,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_bounded_jitter_and_cap() {
        let max = Duration::from_secs(60);
        assert_eq!(backoff_delay(1, max, 0.0), Duration::from_secs(2));
        assert_eq!(backoff_delay(3, max, 0.0), Duration::from_secs(8));
        assert_eq!(backoff_delay(3, max, 1.0), Duration::from_millis(8800));
        assert_eq!(backoff_delay(6, max, 0.5), max);
        assert_eq!(backoff_delay(40, max, 0.0), max);
    }
}
