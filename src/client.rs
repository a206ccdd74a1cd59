//! `wsgate client`: a minimal WebSocket client for trying a gateway by hand, so the demo needs
//! nothing else installed. Sends each `--send` frame, then every line typed on stdin; prints
//! every text frame received, one per line, and the close code when the server closes.

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_tungstenite::tungstenite::Message;

/// Runs until the server closes or stdin ends. Returns a message for the user on failure.
pub async fn run(url: &str, send: &[String]) -> Result<(), String> {
    let (ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .map_err(|e| match e {
            tokio_tungstenite::tungstenite::Error::Http(resp) => {
                let body = resp
                    .body()
                    .as_ref()
                    .map(|b| String::from_utf8_lossy(b).trim().to_string())
                    .unwrap_or_default();
                format!("refused with HTTP {}: {body}", resp.status())
            }
            other => format!("cannot connect: {other}"),
        })?;
    eprintln!("connected; type a line to send it, Ctrl-D to quit");
    let (mut tx, mut rx) = ws.split();
    for frame in send {
        tx.send(Message::text(frame.as_str()))
            .await
            .map_err(|e| format!("send: {e}"))?;
    }
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut stdin_open = true;
    loop {
        tokio::select! {
            msg = rx.next() => match msg {
                Some(Ok(Message::Text(t))) => println!("{t}"),
                Some(Ok(Message::Close(frame))) => {
                    match frame {
                        Some(f) => eprintln!("closed by the server: {} {}", u16::from(f.code), f.reason),
                        None => eprintln!("closed by the server"),
                    }
                    return Ok(());
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(format!("connection lost: {e}")),
                None => return Ok(()),
            },
            line = lines.next_line(), if stdin_open => match line {
                Ok(Some(l)) if !l.is_empty() => {
                    tx.send(Message::text(l)).await.map_err(|e| format!("send: {e}"))?;
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => {
                    stdin_open = false;
                    let _ = tx.send(Message::Close(None)).await;
                }
            },
        }
    }
}
