// Java 17's java.net.http.HttpClient as an application uses it behind a proxy: the default
// ProxySelector reads -Dhttp.proxyHost/-Dhttp.proxyPort and -Dhttps.proxyHost/-Dhttps.proxyPort;
// -Djavax.net.ssl.trustStore names the CA. JDK only.
//   java Client request METHOD URL [BODY]   prints {"status", "reason", "headers", "body"}
//   java Client websocket URL MESSAGE       prints {"echo"}
// HttpResponse has no reason phrase, so "reason" is null. A failure prints the exception as the
// application would log it (with its causes) and exits 1.
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.net.http.WebSocket;
import java.time.Duration;
import java.util.List;
import java.util.Map;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.CompletionStage;
import java.util.concurrent.TimeUnit;

public class Client {
    static final Duration TIMEOUT = Duration.ofSeconds(15);

    public static void main(String[] args) {
        try {
            HttpClient client = HttpClient.newBuilder().connectTimeout(TIMEOUT).build();
            String out = args[0].equals("websocket")
                    ? websocket(client, args[1], args[2])
                    : request(client, args[1], args[2], args.length > 3 ? args[3] : null);
            System.out.print(out);
            System.exit(0);
        } catch (Throwable error) {
            StringBuilder text = new StringBuilder();
            for (Throwable e = error; e != null; e = e.getCause()) {
                text.append(text.length() == 0 ? "" : "\ncaused by ").append(e);
            }
            System.err.println(text);
            System.exit(1);
        }
    }

    static String request(HttpClient client, String method, String url, String body)
            throws Exception {
        HttpRequest.BodyPublisher publisher = body == null
                ? HttpRequest.BodyPublishers.noBody()
                : HttpRequest.BodyPublishers.ofString(body);
        HttpRequest request = HttpRequest.newBuilder(URI.create(url))
                .timeout(TIMEOUT).method(method, publisher).build();
        HttpResponse<String> response = client.send(request, HttpResponse.BodyHandlers.ofString());
        StringBuilder headers = new StringBuilder();
        for (Map.Entry<String, List<String>> header : response.headers().map().entrySet()) {
            headers.append(headers.length() == 0 ? "" : ",")
                    .append(json(header.getKey().toLowerCase())).append(":")
                    .append(json(String.join(", ", header.getValue())));
        }
        return "{\"status\":" + response.statusCode() + ",\"reason\":null,\"headers\":{"
                + headers + "},\"body\":" + json(response.body()) + "}";
    }

    static String websocket(HttpClient client, String url, String message) throws Exception {
        CompletableFuture<String> echo = new CompletableFuture<>();
        WebSocket.Listener listener = new WebSocket.Listener() {
            @Override
            public CompletionStage<?> onText(WebSocket socket, CharSequence data, boolean last) {
                echo.complete(data.toString());
                return null;
            }

            @Override
            public void onError(WebSocket socket, Throwable error) {
                echo.completeExceptionally(error);
            }
        };
        WebSocket socket = client.newWebSocketBuilder().connectTimeout(TIMEOUT)
                .buildAsync(URI.create(url), listener).get(TIMEOUT.toSeconds(), TimeUnit.SECONDS);
        socket.sendText(message, true);
        String text = echo.get(TIMEOUT.toSeconds(), TimeUnit.SECONDS);
        socket.sendClose(WebSocket.NORMAL_CLOSURE, "done");
        return "{\"echo\":" + json(text) + "}";
    }

    static String json(String text) {
        StringBuilder out = new StringBuilder("\"");
        for (char c : text.toCharArray()) {
            if (c == '"' || c == '\\') {
                out.append('\\').append(c);
            } else if (c < 0x20) {
                out.append(String.format("\\u%04x", (int) c));
            } else {
                out.append(c);
            }
        }
        return out.append('"').toString();
    }
}
