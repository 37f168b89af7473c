/*
 * Passkey (WebAuthn) ceremonies for the admin console.
 *
 * Loaded with <script src="/console/static/passkey.js" defer>; works under
 * "script-src 'self'" (no inline handlers, no eval, no string timers).
 *
 *   button#passkey-register -> POST /console/passkey/register/options
 *                              navigator.credentials.create()
 *                              POST /console/passkey/register/verify
 *   button#passkey-login    -> POST /console/passkey/login/options
 *                              navigator.credentials.get()
 *                              POST /console/passkey/login/verify
 *
 * Every POST is same-origin JSON with the X-CSRF-Token header taken from
 * <meta name="csrf-token">.  The server sends py_webauthn's options_to_json
 * text (binary fields base64url) and receives the credential in the JSON shape
 * py_webauthn's parse_*_credential_json accepts.  It answers
 * {"next": "/console/..."} (we navigate there) or {"error": "..."} (shown in
 * #passkey-error, as text only).  Options are converted by hand (no reliance
 * on PublicKeyCredential.parseCreationOptionsFromJSON).
 */
(function () {
  "use strict";

  // ---- base64url <-> ArrayBuffer -------------------------------------------

  function base64urlToBuffer(text) {
    if (typeof text !== "string") {
      throw new TypeError("expected a base64url string");
    }
    var b64 = text.replace(/-/g, "+").replace(/_/g, "/");
    while (b64.length % 4 !== 0) {
      b64 += "=";
    }
    var binary = window.atob(b64);
    var bytes = new Uint8Array(binary.length);
    for (var i = 0; i < binary.length; i++) {
      bytes[i] = binary.charCodeAt(i);
    }
    return bytes.buffer;
  }

  function bufferToBase64url(buffer) {
    var bytes = buffer instanceof ArrayBuffer ? new Uint8Array(buffer)
      : new Uint8Array(buffer.buffer, buffer.byteOffset, buffer.byteLength);
    var binary = "";
    for (var i = 0; i < bytes.length; i++) {
      binary += String.fromCharCode(bytes[i]);
    }
    return window.btoa(binary).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  }

  function convertDescriptors(list) {
    if (!Array.isArray(list)) {
      return [];
    }
    return list.map(function (descriptor) {
      var converted = { type: descriptor.type || "public-key", id: base64urlToBuffer(descriptor.id) };
      if (Array.isArray(descriptor.transports)) {
        converted.transports = descriptor.transports.slice();
      }
      return converted;
    });
  }

  function creationOptions(json) {
    var options = Object.assign({}, json);
    options.challenge = base64urlToBuffer(json.challenge);
    options.user = Object.assign({}, json.user, { id: base64urlToBuffer(json.user.id) });
    options.excludeCredentials = convertDescriptors(json.excludeCredentials);
    return options;
  }

  function requestOptions(json) {
    var options = Object.assign({}, json);
    options.challenge = base64urlToBuffer(json.challenge);
    if (Array.isArray(json.allowCredentials)) {
      options.allowCredentials = convertDescriptors(json.allowCredentials);
    }
    return options;
  }

  // ---- credential -> JSON (py_webauthn's shape) ----------------------------

  function extensionResults(credential) {
    try {
      return typeof credential.getClientExtensionResults === "function"
        ? credential.getClientExtensionResults() : {};
    } catch (e) {
      return {};
    }
  }

  function registrationJSON(credential) {
    var response = credential.response;
    var body = {
      id: credential.id,
      rawId: bufferToBase64url(credential.rawId),
      type: credential.type,
      response: {
        clientDataJSON: bufferToBase64url(response.clientDataJSON),
        attestationObject: bufferToBase64url(response.attestationObject)
      },
      clientExtensionResults: extensionResults(credential)
    };
    if (typeof response.getTransports === "function") {
      var transports = response.getTransports();
      if (Array.isArray(transports) && transports.length > 0) {
        body.response.transports = transports;
      }
    }
    if (credential.authenticatorAttachment) {
      body.authenticatorAttachment = credential.authenticatorAttachment;
    }
    return body;
  }

  function authenticationJSON(credential) {
    var response = credential.response;
    var body = {
      id: credential.id,
      rawId: bufferToBase64url(credential.rawId),
      type: credential.type,
      response: {
        clientDataJSON: bufferToBase64url(response.clientDataJSON),
        authenticatorData: bufferToBase64url(response.authenticatorData),
        signature: bufferToBase64url(response.signature)
      },
      clientExtensionResults: extensionResults(credential)
    };
    if (response.userHandle && response.userHandle.byteLength > 0) {
      body.response.userHandle = bufferToBase64url(response.userHandle);
    }
    if (credential.authenticatorAttachment) {
      body.authenticatorAttachment = credential.authenticatorAttachment;
    }
    return body;
  }

  // ---- page plumbing -------------------------------------------------------

  function csrfToken() {
    var meta = document.querySelector('meta[name="csrf-token"]');
    return meta ? meta.getAttribute("content") || "" : "";
  }

  function errorElement(button) {
    var element = document.getElementById("passkey-error");
    if (!element) {
      element = document.createElement("p");
      element.id = "passkey-error";
      element.className = "error";
      element.setAttribute("role", "alert");
      button.insertAdjacentElement("afterend", element);
    }
    return element;
  }

  function showError(button, message) {
    var element = errorElement(button);
    element.textContent = message;
    element.hidden = false;
  }

  function clearError() {
    var element = document.getElementById("passkey-error");
    if (element) {
      element.textContent = "";
    }
  }

  function isConsolePath(next) {
    // only same-origin console paths: no scheme, no protocol-relative "//host", no backslash tricks
    return typeof next === "string" && next.indexOf("/console/") === 0 &&
      next.indexOf("//") === -1 && next.indexOf("\\") === -1;
  }

  function Stop(message) {
    this.message = message;
  }

  function postJSON(url, payload) {
    return window.fetch(url, {
      method: "POST",
      credentials: "same-origin",
      cache: "no-store",
      headers: {
        "Content-Type": "application/json",
        "Accept": "application/json",
        "X-CSRF-Token": csrfToken()
      },
      body: JSON.stringify(payload)
    }).then(function (response) {
      var type = response.headers.get("Content-Type") || "";
      if (type.indexOf("application/json") === -1) {
        // e.g. a 303 to /console/reauth?next=... followed by fetch: show that page
        if (response.redirected) {
          var target = new URL(response.url);
          if (target.origin === window.location.origin && isConsolePath(target.pathname)) {
            window.location.assign(target.pathname + target.search);
            throw new Stop("");
          }
        }
        throw new Stop("the server refused the request (HTTP " + response.status + ")");
      }
      return response.json().then(function (data) {
        if (data && typeof data.error === "string") {
          throw new Stop(data.error);
        }
        if (data && typeof data.next === "string") {
          if (!isConsolePath(data.next)) {
            throw new Stop("the server answered with an unexpected address");
          }
          window.location.assign(data.next);
          throw new Stop("");
        }
        if (!response.ok) {
          throw new Stop("the server refused the request (HTTP " + response.status + ")");
        }
        return data;
      });
    });
  }

  function browserMessage(error) {
    if (error instanceof Stop) {
      return error.message;
    }
    var name = error && error.name ? error.name : "";
    if (name === "NotAllowedError") {
      return "the passkey prompt was cancelled, timed out or not allowed (NotAllowedError)";
    }
    if (name === "InvalidStateError") {
      return "this authenticator already holds a passkey for this account (InvalidStateError)";
    }
    if (name === "SecurityError") {
      return "the browser refused passkeys for this address (SecurityError); use the configured console host name";
    }
    if (name === "AbortError") {
      return "the passkey prompt was aborted (AbortError)";
    }
    var message = error && error.message ? String(error.message) : String(error);
    return name ? name + ": " + message : message;
  }

  function supported() {
    return typeof window.PublicKeyCredential === "function" &&
      !!navigator.credentials && typeof navigator.credentials.create === "function";
  }

  function ceremony(button, kind) {
    if (!supported()) {
      showError(button, "this browser does not support passkeys");
      return;
    }
    clearError();
    button.disabled = true;
    var payload = {};
    if (kind === "register") {
      var label = document.getElementById("passkey-label");
      if (label && typeof label.value === "string") {
        payload = { label: label.value };
      }
    }
    var base = "/console/passkey/" + kind + "/";
    postJSON(base + "options", payload)
      .then(function (json) {
        if (kind === "register") {
          return navigator.credentials.create({ publicKey: creationOptions(json) })
            .then(function (credential) {
              if (!credential) {
                throw new Stop("no passkey was created");
              }
              return registrationJSON(credential);
            });
        }
        return navigator.credentials.get({ publicKey: requestOptions(json) })
          .then(function (credential) {
            if (!credential) {
              throw new Stop("no passkey was chosen");
            }
            return authenticationJSON(credential);
          });
      })
      .then(function (body) {
        return postJSON(base + "verify", body);
      })
      .then(function () {
        // a success answer without "next": stay on the page
        button.disabled = false;
      })
      .catch(function (error) {
        button.disabled = false;
        var message = browserMessage(error);
        if (message) {
          showError(button, message);
        }
      });
  }

  function bind(id, kind) {
    var button = document.getElementById(id);
    if (!button) {
      return;
    }
    button.addEventListener("click", function (event) {
      event.preventDefault();
      ceremony(button, kind);
    });
  }

  function init() {
    bind("passkey-register", "register");
    bind("passkey-login", "login");
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", init);
  } else {
    init();
  }
})();
